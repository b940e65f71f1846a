"""Command-line interface (`gatedmoe --help`)."""
