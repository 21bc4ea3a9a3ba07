from cloudless.cli.main import main

main()
