"""The web dashboard (issue 13): server-rendered pages under ``/ui/`` over the same use cases as the JSON API.

Why server-rendered HTML with htmx and not a single-page app: every page then works without JavaScript for
reading, the browser never holds an API key, and authorisation stays in the use cases (the page modules only
decode the request, call a use case with the session's ``Principal`` and render a template). ``app.build_ui``
builds the sub-application; ``context`` is what page modules use (``page``, ``render``, ``check_csrf``);
``security`` holds the middlewares (headers, session cookie, CSRF, HTML error pages).
"""
