from weightspace_cli.main import main

main(prog_name="weightspace")
