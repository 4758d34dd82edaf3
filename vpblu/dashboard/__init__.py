"""The controller's web dashboard: the mesh live in a browser, behind a
Kubernetes login (TokenReview) and Kubernetes authorization (SubjectAccessReview).

Modules: `sessions` (the session cookie, CSRF, the login rate limit: pure),
`access` (who a token is and what that user may do, asked of the API server),
`meshview` (the page's data from the VpbluNodes, the policies, the Lease and,
on the leader, the HealthActor's telemetry: pure), `app` (the Starlette routes),
`server` (hypercorn's trio worker inside the controller's process).
"""
