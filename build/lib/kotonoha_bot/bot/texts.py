"""What the bot says to people outside of LLM answers (Japanese, kind and short)."""

from __future__ import annotations

GREETING = "はい、ことはです。どうしましたか？"
RATE_LIMITED_USER = (
    "ごめんなさい、お返事が追いついていません。"
    "{seconds}秒ほどしてから、もう一度話しかけてもらえるとうれしいです。"
)
RATE_LIMITED_GUILD = (
    "ごめんなさい、いまこのサーバーでたくさん話しかけてもらっていて、お返事が追いついていません。"
    "{seconds}秒ほどしてから、もう一度どうぞ。"
)
THREAD_NAME_FALLBACK = "ことはとの会話"
INTERNAL_ERROR = (
    "ごめんなさい、うまく処理できませんでした。少し時間をおいてもう一度試してください。"
)

RESET_DONE = "会話をリセットしました。ここから新しくお話ししましょう。"
RESET_NOTHING = "リセットする会話はまだありません。"
STATUS_NONE = "ここではまだ会話していません。"
SEARCH_DM = "DMではナレッジ検索は使えません（サーバーの知識は、そのサーバーの中だけで使います）。"
SEARCH_EMPTY = "「{query}」に関係する知識は見つかりませんでした。"
FORGET_NEEDS_ADMIN = "チャンネル全体やサーバー全体の削除には「サーバー管理」権限が必要です。"
FORGET_NEEDS_CONFIRM = (
    "{what}のデータをすべて削除します。元には戻せません。"
    "よろしければ `confirm: True` を付けてもう一度実行してください。"
)
FORGET_DONE_ME = (
    "あなたのメッセージ {messages}件と、そこから作られた知識 {chunks}件を削除しました。"
)
FORGET_DONE_SCOPE = (
    "{what}のデータを削除しました（会話 {sessions}件、メッセージ {messages}件、"
    "知識 {chunks}件、資料 {sources}件）。"
)
FORGET_DM_DONE = "このDMでの会話を削除しました。"
FORGET_DM_NOTHING = "このDMには削除する会話がありません。"
EAVESDROP_GUILD_ONLY = "eavesdrop はサーバーのテキストチャンネルでだけ使えます。"
EAVESDROP_NEEDS_PERMISSION = "eavesdrop の切り替えには「チャンネルの管理」権限が必要です。"
EAVESDROP_ON = (
    "このチャンネルで eavesdrop をオンにしました。会話を見守り、役に立てそうなときだけ"
    "ときどき加わります（{cooldown}秒以上あけます）。"
)
EAVESDROP_ON_NO_CONTENT = (
    "\n⚠ メッセージ内容インテント (DISCORD_MESSAGE_CONTENT) が無効なので、"
    "いまは会話の内容が読めません。"
)
EAVESDROP_OFF = "このチャンネルの eavesdrop をオフにしました。"
