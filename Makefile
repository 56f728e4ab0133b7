# overlay: a VXLAN pod network, wire-compatible with flannel.
SHELL := /bin/bash
CARGO ?= cargo
# Everything the build and the tests use on a fresh Debian machine.
APT_PACKAGES := etcd-server etcd-client iproute2 nftables protobuf-compiler libprotobuf-dev iputils-ping procps util-linux \
                podman runc conmon busybox-static containernetworking-plugins iperf3 mmdebstrap iptables \
                containerd gcc libc6-dev curl bind9-dnsutils \
                netcat-openbsd socat iperf wget clang libbpf-dev
# The manifest validator (PyPI), pinned, in a venv of its own; and the
# Kubernetes version whose schemas the manifests must satisfy (the oldest
# k8s-openapi version we build against).
KUBERNETES_VALIDATE := 1.37.0
K8S_VERSION := 1.33.0
PYTOOLS := $(CURDIR)/target/pytools
# The Kubernetes release the real-control-plane tests run (tests/k8s/release),
# built from its Go modules into a cache outside the clone (OVERLAY_K8S_CACHE).
K8S_RELEASE := $(shell cat tests/k8s/release)
K8S_COMPONENTS := kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy e2e.test ginkgo etcd

# `make image`: the base. "debian" builds it from Debian's packages (no
# registry); any Debian-based image name (debian:bookworm-slim) is pulled.
IMAGE_BASE ?= debian

.PHONY: help deps k8s e2e npa-conformance test-fast-path build release image test bench demo demo-down fmt clippy clean validate-manifests
.DEFAULT_GOAL := help

## help: list the targets (what plain `make` does)
help:
	@echo "overlay: a VXLAN pod network, wire-compatible with flannel. Targets:"
	@awk '/^## [a-z-]+: / { line = substr($$0, 4); i = index(line, ": "); printf "  make %-20s %s\n", substr(line, 1, i - 1), substr(line, i + 2) }' $(MAKEFILE_LIST)

## deps: install the system packages and the manifest validator (idempotent; quiet when all are present)
deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi; \
	rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
	@if ! $(PYTOOLS)/bin/kubernetes-validate --version 2>/dev/null | grep -qx '$(KUBERNETES_VALIDATE)'; then \
	  echo "make deps: installing kubernetes-validate $(KUBERNETES_VALIDATE) into $(PYTOOLS)"; \
	  python3 -m venv $(PYTOOLS) && $(PYTOOLS)/bin/pip install -q --disable-pip-version-check 'kubernetes-validate==$(KUBERNETES_VALIDATE)'; \
	fi

## k8s: build the control plane, kubelet, kube-proxy, kubectl, e2e.test and its ginkgo (k8s.io/kubernetes at tests/k8s/release), etcd (tests/k8s/etcd-release) and the nodes' images (pause, agnhost, busybox, CoreDNS), and network-policy-api's conformance runner (tests/k8s/npa-conformance) into /var/cache/overlay-k8s (idempotent)
k8s: deps
	@tests/k8s/build $(K8S_RELEASE) $(K8S_COMPONENTS)
	@tests/k8s/images $(K8S_RELEASE)
	@tests/k8s/npa-conformance/build

## e2e: the whole upstream sig-network selection (tests/k8s/e2e/full.txt less skip.txt) on three real nodes, dual stack then IPv4 alone (E2E_FAMILIES=dual or ipv4 for one); writes docs/conformance.md
E2E_FAMILIES ?= dual ipv4
e2e: deps k8s
	$(CARGO) build --workspace --bins
	@rc=0; for f in $(E2E_FAMILIES); do \
	  OVERLAY_FAMILIES=$$f OVERLAY_E2E=full OVERLAY_E2E_REPORT=$(CURDIR)/docs/conformance.md \
	    $(CARGO) test -p overlay-tests --test kube_nodes -- --include-ignored the_upstream_sig_network_e2e_tests_pass || rc=1; \
	done; exit $$rc

## test-fast-path: the mesh, NAT, MTU, migration, self-healing, CNI, podman and NetworkPolicy suites again, every daemon with --fast-path (as root; about 7 minutes)
test-fast-path: deps
	$(CARGO) build --workspace --bins
	@tests/leftovers sweep
	@tests/leftovers snapshot > target/leftovers.before
	@rc=0; OVERLAY_TEST_FAST_PATH=1 $(CARGO) test -p overlay-tests --test dual_stack --test etcd_overlay --test migration \
	  --test self_healing --test cni_plugin --test podman --test network_policy --test network_policy_input \
	  --test kube_dual_stack --test kube_overlay -- --test-threads 2 --include-ignored || rc=$$?; \
	  tests/leftovers check target/leftovers.before || rc=1; exit $$rc

## npa-conformance: network-policy-api's ClusterNetworkPolicy conformance suite (every test) on three real nodes, dual stack then IPv4 alone (E2E_FAMILIES); writes its part of docs/conformance.md
npa-conformance: deps k8s
	$(CARGO) build --workspace --bins
	@rc=0; for f in $(E2E_FAMILIES); do \
	  OVERLAY_FAMILIES=$$f OVERLAY_NPA=full OVERLAY_NPA_REPORT=$(CURDIR)/docs/conformance.md \
	    $(CARGO) test -p overlay-tests --test kube_nodes -- --include-ignored the_network_policy_api_conformance_tests_pass || rc=1; \
	done; exit $$rc

## validate-manifests: every document of deploy/overlay.yaml against the Kubernetes schemas, strictly
validate-manifests: deps
	$(PYTOOLS)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) deploy/overlay.yaml

## build: debug build of overlayd, overlay-cni and the test tools
build:
	$(CARGO) build --workspace --bins

## release: release build (what bench and demo run)
release:
	$(CARGO) build --release --workspace --bins

## image: the container image deploy/overlay.yaml runs, from the release binaries, with podman or docker (IMAGE_BASE=debian:bookworm-slim: pull a base instead of building one from Debian's packages)
image: deps release
	deploy/build-image --base $(IMAGE_BASE) --report

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## clippy: lint, warnings are errors
clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: format and lint checks, then every test (unit and end-to-end, as root); fails if a test leaves anything behind
test: deps k8s validate-manifests
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	@tests/leftovers sweep
	@tests/leftovers snapshot > target/leftovers.before
	@rc=0; $(CARGO) test --workspace -- --test-threads 2 --include-ignored || rc=$$?; \
	  tests/leftovers check target/leftovers.before || rc=1; exit $$rc

## bench: cold start, bursts, memory and CPU beside the `ip -batch` floor; the dataplane (flannel's path, --fast-path, node to node)
bench: deps release
	OVERLAYD_BIN=$(CURDIR)/target/release/overlayd $(CURDIR)/target/release/overlay-bench

## demo: a 3-node cluster in namespaces with etcd and 2 pods per node; stays up
demo: deps release
	OVERLAYD_BIN=$(CURDIR)/target/release/overlayd $(CURDIR)/target/release/overlay-demo up

## demo-down: remove the demo cluster (namespaces, processes, files)
demo-down:
	@for ns in $$(ip netns list 2>/dev/null | awk '/^ovdemo/ {print $$1}'); do \
	  for pid in $$(ip netns pids $$ns 2>/dev/null); do kill $$pid 2>/dev/null; done; \
	done; sleep 0.5; \
	for ns in $$(ip netns list 2>/dev/null | awk '/^ovdemo/ {print $$1}'); do \
	  for pid in $$(ip netns pids $$ns 2>/dev/null); do kill -9 $$pid 2>/dev/null; done; \
	  ip netns del $$ns; \
	done; rm -rf /tmp/overlay-test-demo; echo "demo removed"

## clean: remove build output
clean:
	$(CARGO) clean
