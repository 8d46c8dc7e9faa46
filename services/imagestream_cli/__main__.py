from imagestream_cli.entry import entry

entry()
