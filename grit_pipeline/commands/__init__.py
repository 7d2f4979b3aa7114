"""Click commands of the `grit` CLI, one module per area."""
