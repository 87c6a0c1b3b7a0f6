"""The source side of a poll: HTTP requests to the API, page by page.

`fetcher` sends a sync's requests and yields its pages; `paginate`, `auth` and `ratelimit` are the
small strategies it uses; `tls` builds the TLS settings. Nothing here knows about the store or
about webhooks.
"""
