from imagestream_cli.main import main

main()
