// The cluster's DNS: CoreDNS with only the plugins a one-node test cluster needs (Service and pod
// names from the API server), so that it builds in a fraction of the full server's time.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func init() {
	dnsserver.Directives = []string{"errors", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
