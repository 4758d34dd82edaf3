"""vpblu: an encrypted node-to-node WireGuard mesh for Kubernetes."""
