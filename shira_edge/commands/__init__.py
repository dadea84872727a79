"""One module per CLI command; `shira_edge.cli` imports each only when it runs."""
