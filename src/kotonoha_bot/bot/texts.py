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

SEARCH_LINK = "元の会話"
FORGET_DONE_ME_MEMORIES = "覚えていたこと {memories}件も削除しました。"

KB_ADD_GUILD_ONLY = "資料の追加はサーバーの中でだけ使えます。"
KB_ADD_NEEDS_ADMIN = "資料の追加には「サーバー管理」権限が必要です。"
KB_ADD_TYPE = "追加できるのは .txt・.md・.pdf のファイルです（「{name}」は読めません）。"
KB_ADD_TOO_LARGE = "「{name}」は大きすぎます（{size}、上限 {limit}）。"
KB_ADD_READING = "📥 「{name}」を読み込んでいます…"
KB_ADD_EMBEDDING = "🧩 「{name}」を知識にしています… {done}/{total}"
KB_ADD_DONE = "✅ 「{name}」を知識に追加しました（{chunks}件の断片）。"
KB_ADD_UPDATED = "✅ 「{name}」を新しい内容で置き換えました（{chunks}件の断片）。"
KB_ADD_UNCHANGED = "「{name}」は前と同じ内容なので、そのままにしました。"
KB_ADD_PENDING = (
    "⚠ 「{name}」は保存しましたが、埋め込みがまだです（{chunks}件）。"
    "しばらくすると自動で検索できるようになります。"
)
KB_ADD_FAILED = "「{name}」を追加できませんでした: {reason}"
KB_ADD_INVALID_UTF8 = "\n（UTF-8 として読めない文字は置き換えました）"

MEMORY_ADDED = "覚えました（#{id}）: {text}"
MEMORY_EMPTY = "覚えておくことを書いてください。"
MEMORY_TOO_LONG = "長すぎます（{length}文字、上限 {limit}文字）。短くしてもう一度どうぞ。"
MEMORY_FULL = (
    "ここで覚えておけるのは {limit}件までです。`/memory list` で確認して、"
    "`/memory delete` で減らしてください。"
)
MEMORY_LIST_EMPTY = "ここで覚えていることはまだありません。`/memory add` で教えてください。"
MEMORY_LIST_HEAD = "**あなたについて覚えていること**（{count}件、ここでだけ使います）"
MEMORY_LIST_MORE = "…ほか {more}件"
MEMORY_DELETED = "#{id} を忘れました。"
MEMORY_NOT_FOUND = "#{id} は見つかりませんでした（あなたのものではないか、もうありません）。"
WHY_NONE = (
    "ここでの最近のお返事の記録がありません（再起動のあとはまだ話していないか、"
    "別のプロセスが答えました）。"
)
WHY_HEAD = "**前回のお返事（<t:{at}:R>）で使ったもの**"
WHY_HISTORY = "- 会話の履歴: {used}件（この会話の全 {total}件のうち）"
WHY_REFS_NONE = "- 参考にした知識: なし"
WHY_REFS = "- 参考にした知識: {count}件"
WHY_REF_GONE = "（削除済み）"
WHY_JUDGED = "- 関連性の判定（LLM）: {out}件を関係なしとして除外"
WHY_JUDGED_OUT = "  - 除外: {label} ({score:.3f})"
WHY_UNJUDGED = "- 関連性の判定（LLM）: できず（{cause}）、参考はそのまま使用"
WHY_UNJUDGED_CAUSES = {
    "timeout": "時間切れ",
    "error": "APIエラー",
    "budget": "今日のトークン上限",
    "unparsed": "答えを読み取れず",
}
WHY_MEMORIES_NONE = "- あなたの記憶: なし"
WHY_MEMORIES = "- あなたの記憶: {count}件"
WHY_MEMORIES_DELETED = "  - （そのあと削除された記憶 {count}件）"
WHY_TOKENS = "- トークン: 入力 {input} / 出力 {output}（{model}）"

USAGE_NEEDS_ADMIN = "利用状況を見るには「サーバー管理」権限が必要です。"
USAGE_HEAD = "**このサーバーの LLM 利用状況**（UTC）"
USAGE_LINE = "- {label}: {calls}回、入力 {input} / 出力 {output} トークン（計 {total}）"
USAGE_BUDGET = "- 1日の上限: サーバー {guild} / ひとり {user}"
USAGE_UNLIMITED = "なし"
USAGE_MODEL = "  - {model}: {total} トークン"
USAGE_USER = "  - <@{user}>: {total} トークン"
