"""The `imagestream` command and what it does on a client or node: push (read an OCI image, convert it,
publish it), run (mount or pull, then a sandboxed command), and the views of images and nodes."""
