from edge_tune.cli import main

main()
