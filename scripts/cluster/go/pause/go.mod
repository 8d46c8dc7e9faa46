module imagestream.local/cluster/pause

go 1.26.8
