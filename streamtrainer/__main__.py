from streamtrainer.cli import main

main()
