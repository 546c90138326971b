from kotonoha_bot.cli import main

main()
