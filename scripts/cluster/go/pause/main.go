// The pod sandbox's "pause" process: the node cannot pull registry.k8s.io/pause, so the cluster
// builds this one and serves it from its own registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
}
