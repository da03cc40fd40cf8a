from broker.tools.cli import main

main()
