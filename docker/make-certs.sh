#!/usr/bin/env bash
# Certificates for the compose rehearsal: CA + SuperLink cert (coordinator) and one node key per site.
# In a real federation each hospital runs `fedseg certs node` itself and sends only the .pub file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fedseg certs server "$here/certs" --host superlink --host 127.0.0.1 --host localhost
for site in site-a site-b site-c; do
  fedseg certs node "$here/keys" --name "$site"
done
