from chatsession_server.cli import main

main()
