from dtask.cli import main

main()
