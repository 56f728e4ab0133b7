// The network-policy-api conformance suite, as the module's own TestConformance runs it, with the base manifests
// of this directory (the module's, less the SCTP servers when the kernel has no SCTP) and -skip-tests.
package conformance_test

import (
	"embed"
	"flag"
	"strings"
	"testing"

	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/config"
	api "sigs.k8s.io/network-policy-api/apis/v1alpha2"
	"sigs.k8s.io/network-policy-api/conformance/tests"
	"sigs.k8s.io/network-policy-api/conformance/utils/flags"
	"sigs.k8s.io/network-policy-api/conformance/utils/suite"
)

//go:embed base
var manifests embed.FS

var skipTests = flag.String("skip-tests", "", "comma-separated short names of tests not to run")

// The suite's host-network servers listen on 8 ports from 34345 by default, inside Linux's ephemeral range
// (32768-60999), where a node's own outgoing connections (or containerd's streaming server on 127.0.0.1:0) may
// hold one, and the pod then cannot start. The runner can move them below it.
var hostPortsFrom = flag.Int("host-network-ports-from", 0, "the first of the 8 ports of the host-network servers (0: the suite's default)")

func TestConformance(t *testing.T) {
	cfg, err := config.GetConfig()
	if err != nil {
		t.Fatalf("loading the kubeconfig: %v", err)
	}
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatalf("a client: %v", err)
	}
	clientset, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("a clientset: %v", err)
	}
	if err := api.Install(c.Scheme()); err != nil {
		t.Fatalf("installing the API's scheme: %v", err)
	}
	var skip []string
	if *skipTests != "" {
		skip = strings.Split(*skipTests, ",")
	}
	options := suite.Options{
		Client:               c,
		ClientSet:            clientset,
		KubeConfig:           *cfg,
		Debug:                *flags.ShowDebug,
		CleanupBaseResources: *flags.CleanupBaseResources,
		SupportedFeatures:    suite.ParseSupportedFeatures(*flags.SupportedFeatures),
		SkipTests:            skip,
		FS:                   &manifests,
	}
	if *hostPortsFrom != 0 {
		options.HostNetworkPortRangeStart = *hostPortsFrom
		options.HostNetworkPortRangeEnd = *hostPortsFrom + 7
	}
	s := suite.New(options)
	s.Setup(t)
	s.Run(t, tests.ConformanceTests)
}
