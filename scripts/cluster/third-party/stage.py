"""The build context of the stand-in images (Containerfile beside this file): the Zipkin server jar and
Cassandra's jars (Maven Central, through the local stack's own fetchers, cached), Cassandra's
configuration and JVM arguments as the local stack writes them, for a node whose state is
/var/lib/cassandra and whose configuration is /etc/cassandra.

    python stage.py CACHE_DIR OUT_DIR
"""

import os
import pathlib
import shutil
import sys

from imagestream_dev.stack import cassandra, zipkin

cache, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
here = pathlib.Path(__file__).parent
shutil.rmtree(out, ignore_errors=True)
(out / "cassandra").mkdir(parents=True)
shutil.copy(here / "Containerfile", out)
shutil.copy(here / "cassandra-start", out)
os.link(zipkin.ensure_jar(cache / "zipkin"), out / "zipkin.jar")
lib = cassandra.ensure_jars(cache / "cassandra")
shutil.copytree(lib, out / "cassandra" / "lib", copy_function=os.link)
node = cassandra.CassandraNode("imagestream", pathlib.Path("/var/lib/cassandra"), heap_mb=512, heap_min_mb=256,
                               class_data_sharing=False)
staged = cassandra.CassandraNode("imagestream", out / "node", class_data_sharing=False)
cassandra.write_config(staged)
conf = out / "cassandra" / "conf"
shutil.copytree(staged.conf_dir, conf)
shutil.rmtree(out / "node")
for f in conf.iterdir():  # the staging folder's paths -> the image's
    if f.is_file():
        f.write_text(f.read_text().replace(str(staged.conf_dir), "/etc/cassandra").replace(str(staged.node_dir), "/var/lib/cassandra"))
args = cassandra.command(node, pathlib.Path("/opt/cassandra/lib"), java="java")[1:]
(conf / "jvm.args").write_text("\n".join(a.replace(str(node.conf_dir), "/etc/cassandra") for a in args) + "\n")
