from covidcxr.cli import main

main()
