"""The dashboard's words in English and Japanese, chosen by the browser's Accept-Language.

One table, one key per text, both languages side by side so a missing translation is
seen at once (a test checks both have every key). Texts are plain; templates escape
them like any other value.
"""

from __future__ import annotations

from collections.abc import Callable

LANGUAGES = ("en", "ja")
DEFAULT_LANGUAGE = "en"

#: key -> (English, Japanese)
TEXTS: dict[str, tuple[str, str]] = {
    "app_title": ("kotonoha dashboard", "ことは ダッシュボード"),
    "nav_status": ("Status", "状態"),
    "nav_memory": ("Memory", "記憶"),
    "nav_search": ("Search", "検索"),
    "nav_conversations": ("Conversations", "会話"),
    "nav_usage": ("Usage", "使用量"),
    "logout": ("Log out", "ログアウト"),
    # login
    "login_title": ("Log in", "ログイン"),
    "login_token": (
        "Dashboard token (DASHBOARD_TOKEN)",
        "ダッシュボードのトークン（DASHBOARD_TOKEN）",
    ),
    "login_button": ("Log in", "ログイン"),
    "login_bad": ("That token is not right.", "トークンが違います。"),
    "login_limited": (
        "Too many attempts. Try again in {seconds} seconds.",
        "試行が多すぎます。{seconds} 秒後にもう一度お試しください。",
    ),
    "login_expired": (
        "The login form expired; please try again.",
        "ログインフォームの有効期限が切れました。もう一度お試しください。",
    ),
    # errors
    "error_title": ("Something is not right", "うまくいきませんでした"),
    "not_found": ("Not found in this server's data.", "このサーバーのデータには見つかりません。"),
    "csrf_failed": (
        "The request was refused (CSRF check failed). Reload the page and try again.",
        "リクエストを拒否しました（CSRF 検査に失敗）。ページを再読み込みしてください。",
    ),
    "back": ("Back", "戻る"),
    # status
    "status_title": ("Status", "状態"),
    "bot": ("Bot", "ボット"),
    "running": ("Answering", "応答中"),
    "paused": ("Paused: answers nothing", "一時停止中：何にも応答しません"),
    "paused_since": ("since {time} (by {who})", "{time} から（{who}）"),
    "pause": ("Pause the bot", "ボットを一時停止"),
    "resume": ("Resume", "再開"),
    "pause_help": (
        "Paused, the bot answers no message (no LLM call); edits, deletes and /kb forget"
        " still follow Discord. Every bot process sharing this database obeys it.",
        "一時停止中は、どのメッセージにも応答しません（LLM も呼びません）。編集・削除・"
        "/kb forget は引き続き反映されます。このデータベースを使うすべてのボットに効きます。",
    ),
    "health": ("Health", "稼働状況"),
    "discord": ("Discord", "Discord"),
    "llm": ("LLM", "LLM"),
    "connected": ("connected", "接続中"),
    "not_connected": ("not connected", "未接続"),
    "unknown": ("unknown", "不明"),
    "llm_ok": ("answering", "応答あり"),
    "llm_failing": ("failing", "失敗中"),
    "llm_unknown": ("no call yet", "まだ呼び出しなし"),
    "last_ok": ("last answer", "最後の応答"),
    "last_error": ("last failure", "最後の失敗"),
    "health_from": ("as reported by {source}", "{source} による"),
    "database": ("Database", "データベース"),
    "backend": ("Backend", "バックエンド"),
    "location": ("Location", "場所"),
    "versions": ("Versions", "バージョン"),
    "schema": ("Schema", "スキーマ"),
    "schema_current": ("version {version} (current)", "バージョン {version}（最新）"),
    "schema_old": (
        "version {version}, this code expects {expected}",
        "バージョン {version}（このコードは {expected} を想定）",
    ),
    "migration_marker": ("Migration", "移行"),
    "migration_none": ("none in progress", "進行中の移行なし"),
    "migration_running": (
        "unfinished `kotonoha db migrate` into this database",
        "このデータベースへの `kotonoha db migrate` が未完了です",
    ),
    "size": ("Size", "サイズ"),
    "counts": ("Counts", "件数"),
    "sessions": ("Sessions", "セッション"),
    "messages": ("Messages", "メッセージ"),
    "sources": ("Sources", "ソース"),
    "chunks": ("Chunks", "チャンク"),
    "pending": ("Pending embeddings", "埋め込み待ち"),
    "memories": ("Memories", "メモリー"),
    "index": ("Vector index", "ベクトル索引"),
    "index_state_ready": ("ready", "使用可"),
    "index_state_building": ("building", "構築中"),
    "index_state_cold": ("loads on first search", "初回検索で読み込み"),
    "index_state_missing": ("none: exact search", "なし：厳密検索"),
    "index_state_invalid": ("invalid", "無効"),
    "rebuild_index": ("Rebuild the index", "索引を再構築"),
    "embedder": ("Embedder", "埋め込みモデル"),
    "embedder_db": ("recorded in the database", "データベースに記録"),
    "embedder_live": ("in use", "使用中"),
    "embedder_none": ("none (keyword search only)", "なし（キーワード検索のみ）"),
    "dimension": ("{n} dimensions", "{n} 次元"),
    "backup": ("Backup", "バックアップ"),
    "backup_last": ("last backup", "最後のバックアップ"),
    "backup_failed": ("last failure", "最後の失敗"),
    "backup_never": ("none recorded", "記録なし"),
    "backup_now": ("Back up now", "今すぐバックアップ"),
    "backup_running": ("a backup is running (since {time})", "バックアップ実行中（{time} から）"),
    "backup_done": ("backup written: {path}", "バックアップ完了：{path}"),
    # memory
    "memory_title": ("Memory", "記憶"),
    "guilds": ("Servers", "サーバー"),
    "guild": ("Server", "サーバー"),
    "no_guilds": ("No server has stored data yet.", "データのあるサーバーはまだありません。"),
    "last_active": ("Last active", "最終活動"),
    "documents": ("Documents", "ドキュメント"),
    "conversation_sources": ("Archived conversations", "保存された会話"),
    "title": ("Title", "タイトル"),
    "uri": ("URI", "URI"),
    "status": ("Status", "状態"),
    "updated": ("Updated", "更新"),
    "actions": ("", ""),
    "delete": ("Delete", "削除"),
    "confirm_delete": ("Delete this for good?", "完全に削除しますか？"),
    "deleted": ("Deleted.", "削除しました。"),
    "none_yet": ("Nothing here yet.", "まだありません。"),
    "upload": ("Add a document to this server", "このサーバーにドキュメントを追加"),
    "upload_button": ("Upload", "アップロード"),
    "upload_help": (
        "Text, Markdown, HTML or PDF, at most {size}. It becomes searchable knowledge"
        " of this server only.",
        "テキスト・Markdown・HTML・PDF（{size} まで）。このサーバーだけの知識になります。",
    ),
    "uploaded": (
        "Added {name}: {outcome}, {chunks} chunks.",
        "{name} を追加：{outcome}、{chunks} チャンク。",
    ),
    "upload_too_big": ("The file is larger than {size}.", "ファイルが {size} を超えています。"),
    "upload_empty": ("Choose a file first.", "ファイルを選んでください。"),
    "chunk": ("Chunk", "チャンク"),
    "text": ("Text", "本文"),
    "embedded": ("vector", "ベクトル"),
    "yes": ("yes", "あり"),
    "no": ("pending", "待ち"),
    "provenance": ("From messages", "元のメッセージ"),
    "open_in_discord": ("open in Discord", "Discord で開く"),
    "page": ("Page {n}", "{n} ページ"),
    "prev": ("Previous", "前へ"),
    "next": ("Next", "次へ"),
    "memories_title": ("Explicit memories", "明示的なメモリー"),
    "user": ("User", "ユーザー"),
    "created": ("Created", "作成"),
    "filter": ("Filter", "絞り込み"),
    "user_id": ("User id", "ユーザー ID"),
    "channel_id": ("Channel or thread id", "チャンネル／スレッド ID"),
    # search
    "search_title": ("Search playground", "検索プレイグラウンド"),
    "query": ("Query", "検索語"),
    "top_k": ("Hits", "件数"),
    "vector_share": ("Vector share (HYBRID_VECTOR_SHARE)", "ベクトルの比重（HYBRID_VECTOR_SHARE）"),
    "min_similarity": (
        "Similarity floor (SEARCH_MIN_SIMILARITY)",
        "類似度の下限（SEARCH_MIN_SIMILARITY）",
    ),
    "min_coverage": ("Coverage floor (SEARCH_MIN_COVERAGE)", "網羅率の下限（SEARCH_MIN_COVERAGE）"),
    "profile_default": ("empty = the measured profile ({value})", "空欄＝計測済みの値（{value}）"),
    "run": ("Search", "検索"),
    "mode_vector": ("Vector", "ベクトル"),
    "mode_keyword": ("Keyword", "キーワード"),
    "mode_hybrid": ("Hybrid (what the bot uses)", "ハイブリッド（ボットが使用）"),
    "rank_vector": ("vec #", "ベクトル順位"),
    "rank_keyword": ("kw #", "キーワード順位"),
    "similarity": ("similarity", "類似度"),
    "coverage": ("coverage", "網羅率"),
    "score": ("score", "スコア"),
    "floor": ("Relevance floor", "関連性の下限"),
    "floor_keeps": (
        "kept: best similarity {sim} / best coverage {cov} vouch for the query",
        "採用：最良の類似度 {sim}／網羅率 {cov} が下限を満たします",
    ),
    "floor_drops": (
        "the floor would drop every hit: best similarity {sim} < {min_sim} and best"
        " coverage {cov} < {min_cov}; the bot would send no reference",
        "下限によりすべて除外：最良の類似度 {sim} < {min_sim}、網羅率 {cov} < {min_cov}。"
        "ボットは参考情報を送りません",
    ),
    "below_floor": ("below the floor", "下限未満"),
    "exact_lead": (
        "first by the exact-match lead: it holds every informative term of the query",
        "完全一致の優先: クエリの情報を持つ語をすべて含むため先頭",
    ),
    "no_hits": ("No hits.", "該当なし。"),
    "settings_to_copy": ("Settings for .env", ".env 用の設定"),
    "warnings": ("Warnings", "警告"),
    # conversations
    "conversations_title": ("Conversations", "会話"),
    "session": ("Session", "セッション"),
    "type": ("Type", "種類"),
    "channel": ("Channel", "チャンネル"),
    "thread": ("Thread", "スレッド"),
    "transcript": ("Transcript", "記録"),
    "role_user": ("user", "ユーザー"),
    "role_assistant": ("kotonoha", "ことは"),
    "role_system": ("system", "システム"),
    "delete_conversation": (
        "Delete this conversation and the knowledge built from it",
        "この会話と、そこから作られた知識を削除",
    ),
    "conversation_deleted": (
        "Deleted {messages} messages and {chunks} chunks.",
        "{messages} 件のメッセージと {chunks} 件のチャンクを削除しました。",
    ),
    # usage
    "usage_title": ("Usage", "使用量"),
    "tokens_per_day": (
        "LLM tokens per server and day (UTC)",
        "サーバー別・日別の LLM トークン（UTC）",
    ),
    "days": ("Days", "日数"),
    "today": ("Today", "今日"),
    "month": ("This month", "今月"),
    "calls": ("Calls", "呼び出し"),
    "tokens": ("Tokens", "トークン"),
    "budget": ("Daily budget", "1日の上限"),
    "budget_none": ("no limit", "上限なし"),
    "budget_left": ("{left} left", "残り {left}"),
    "budget_reached": (
        "reached: answers are refused until 00:00 UTC",
        "上限到達：UTC 0時まで応答しません",
    ),
    "user_budget": ("Per-user daily budget", "ユーザーごとの1日の上限"),
    "dms": ("DMs", "DM"),
    "other": ("other", "その他"),
    "no_usage": ("No LLM calls recorded in these days.", "この期間の LLM 呼び出しはありません。"),
}


def negotiate(accept_language: str | None) -> str:
    """The best of our languages for an ``Accept-Language`` header (default English)."""
    best, best_q = DEFAULT_LANGUAGE, -1.0
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower().split("-")[0]
        # Earlier entries win ties (the header's own order).
        if lang in LANGUAGES and q > 0 and (q > best_q or (q == best_q and position == 0)):
            best, best_q = lang, q
    return best


def translator(lang: str) -> Callable[..., str]:
    """``t(key, **values)`` in ``lang``."""
    index = LANGUAGES.index(lang) if lang in LANGUAGES else 0

    def t(key: str, **values: object) -> str:
        text = TEXTS[key][index]
        return text.format(**values) if values else text

    return t
