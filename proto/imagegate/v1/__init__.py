"""Generated code for imagegate.v1; regenerate with `make proto`."""
