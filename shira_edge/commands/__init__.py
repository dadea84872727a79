"""The CLI, click only: one module per command, each a thin layer over a library module (`shira_edge.pack`,
`shira_edge.export`, `shira_edge.tuner.train`, `shira_edge.bench`, the runtime) that turns its errors into an
`Error:` line and exit code 1. `shira_edge.cli` imports each only when it runs."""
