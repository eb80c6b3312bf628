from edgetransfer.cli import main

main()
