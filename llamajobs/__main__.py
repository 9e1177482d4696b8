from llamajobs.cli import main

main()
