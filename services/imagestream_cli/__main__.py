from imagestream_cli.main import entry

entry()
