from diffferv_cli.cli import main

main()
