from weightspace_cli.main import main

__all__: list[str] = []

main(prog_name="weightspace")
