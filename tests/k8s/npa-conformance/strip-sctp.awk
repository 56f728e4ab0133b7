# The network-policy-api conformance suite's base manifests (conformance/base/manifests.yaml) less every container
# that serves SCTP (`agnhost porter` with SERVE_SCTP_PORT_*): on a kernel without SCTP, porter exits at start, its
# pod never becomes Ready, and the suite fails its setup before any test. A container is a "- name:" item at eight
# spaces; it ends at the next one, or at a line indented less.
function flush() { if (block != "" && block !~ /SERVE_SCTP_PORT_/) printf "%s", block; block = "" }
/^        - name: / { flush(); inblock = 1 }
inblock && (/^---/ || /^[ ]{0,7}[^ ]/ || /^      [^ ]/) { flush(); inblock = 0 }
{ if (inblock) block = block $0 "\n"; else print }
END { flush() }
