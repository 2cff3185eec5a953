//! The admin dashboard on a real gateway, real Postgres and the tiny
//! model: no page or action without a session (team API keys open
//! nothing), no action without the session's CSRF token or by a viewer,
//! a lock after repeated bad passwords, promotion and rollback from the
//! pages with their audit entries, and everything users typed shown
//! escaped. `a_real_browser_...` then drives the same pages in Debian's
//! headless Chromium (through playwright-core) and keeps screenshots.

use std::collections::HashMap;

use flywheel_store::keys::Scope;
use flywheel_tests::TestGateway;
use flywheel_tests::admin::{Client, PASSWORD, Resp, account, flushed, form, signed_in};
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::{Value, json};

/// POSTs a form of owned fields.
async fn send(c: &Client, path: &str, f: Vec<(String, String)>) -> Resp {
    let fields: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    c.post(path, &fields).await
}

/// A second tiny model (other weights), registered as `name`.
async fn another_version(gw: &TestGateway, name: &str) -> flywheel_store::models::ModelVersion {
    let dir = std::env::temp_dir().join(format!("fw-dash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 7).unwrap();
    let cache = flywheel_modelhub::ModelCache::new(dir.join("cache")).unwrap();
    let model = cache.import(&path, Some(name)).await.unwrap();
    flywheel::register(&gw.db.pool, &model).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_or_action_without_a_session_and_team_keys_open_nothing() {
    let gw = TestGateway::tiny().await;
    let anon = Client::new(&gw);
    let r = anon.get("/admin/completions?team=team-a").await;
    assert_eq!(r.status, 303);
    assert_eq!(
        r.headers[LOCATION],
        "/admin/login?next=/admin/completions%3Fteam%3Dteam-a"
    );
    // The team's own API key is no admin credential.
    let with_key = anon
        .send(
            anon.http
                .get(format!("{}/admin", gw.base))
                .bearer_auth(&gw.key),
        )
        .await;
    assert_eq!(with_key.status, 303);
    let api = anon.get("/admin/api/overview").await;
    assert_eq!(api.status, 401);
    let err: Value = serde_json::from_str(&api.body).unwrap();
    assert_eq!(err["error"]["message"], "sign in first");
    // Actions too, and nothing happens.
    let r = anon
        .post(
            "/admin/models/rollback",
            &[("team", "team-a"), ("reason", "x"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert!(
        flywheel_store::decisions::list(&gw.db.pool, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A cookie that is no session's.
    let mut forged = Client::new(&gw);
    forged.cookie = Some(format!("flywheel_admin={}", "ab".repeat(32)));
    assert_eq!(forged.get("/admin").await.status, 303);
    // The sign-in page itself is open, and sends no session: only its
    // form's CSRF cookie.
    let login = anon.get("/admin/login").await;
    assert_eq!(login.status, 200);
    let cookies: Vec<&str> = login
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert!(
        cookies[0].starts_with("flywheel_login=")
            && cookies[0].contains("HttpOnly; SameSite=Strict"),
        "{cookies:?}"
    );
}

/// A key given the `admin` scope calls the JSON API as an admin (no
/// cookie, no CSRF token) and the audit log names it; a team key without
/// the scope gets 403, a revoked one 401, and no key opens a page.
#[tokio::test]
async fn only_a_key_with_the_admin_scope_opens_the_json_api() {
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    let c = Client::new(&gw);
    let call = |key: &str, path: &str, body: Option<Value>| {
        let req = match body {
            Some(b) => c.http.post(format!("{}{path}", gw.base)).json(&b),
            None => c.http.get(format!("{}{path}", gw.base)),
        };
        c.send(req.bearer_auth(key))
    };
    // The team's key has the four default scopes, not admin.
    let r = call(&gw.key, "/admin/api/overview", None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("not `admin`"), "{}", r.body);

    let (info, ops) = flywheel_store::keys::create_key_with(pool, "platform", &[Scope::Admin])
        .await
        .unwrap();
    let r = call(&ops, "/admin/api/overview", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(
        &ops,
        "/admin/api/teams/limits",
        Some(json!({"team": "team-a", "requests_per_minute": 7, "tokens_per_minute": null})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let who = flywheel_store::keys::authenticate(pool, &gw.key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who.limits.requests_per_minute, Some(7));
    // An action that goes into the audit log names the key.
    another_version(&gw, "tiny-b").await;
    let r = call(
        &ops,
        "/admin/api/promote",
        Some(json!({"team": "team-a", "model": "tiny-b", "reason": "automation check"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let decisions = flywheel_store::decisions::list(pool, None, 10)
        .await
        .unwrap();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert!(
        decisions[0].actor.contains(&info.id.to_string())
            && decisions[0].reason == "automation check",
        "{decisions:?}"
    );
    // Pages are for people: the admin key opens none.
    let page = c
        .send(c.http.get(format!("{}/admin", gw.base)).bearer_auth(&ops))
        .await;
    assert_eq!(page.status, 303);
    // It opens no route of the team API it was not given.
    let (status, _) = gw
        .post(
            &ops,
            "/v1/chat/completions",
            json!({"model": gw.model(), "max_tokens": 1,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 403);
    // Revoked: refused like no key at all.
    flywheel_store::keys::revoke_key(pool, &info.prefix)
        .await
        .unwrap();
    let r = call(&ops, "/admin/api/overview", None).await;
    assert_eq!(r.status, 401, "{}", r.body);
}

/// Login CSRF: a sign-in form posted from another site (no token, or a
/// token this browser's cookie does not hold) signs nobody in, however
/// right the password; the page's own form does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_posted_from_another_site_is_refused() {
    let gw = TestGateway::tiny().await;
    account(&gw, "ada", "admin").await;
    let c = Client::new(&gw);
    let post = |cookie: Option<String>, csrf: Option<String>| {
        let mut fields = vec![
            ("username", "ada".to_string()),
            ("password", PASSWORD.to_string()),
        ];
        fields.extend(csrf.map(|t| ("csrf", t)));
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut req = c
            .http
            .post(format!("{}/admin/login", gw.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&fields));
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        c.send(req)
    };
    let signed_in = |r: &Resp| {
        r.headers
            .get_all(SET_COOKIE)
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("flywheel_admin="))
    };
    // No token at all: the attacker's page posts only the credentials.
    let bare = post(None, None).await;
    assert_eq!(bare.status, 403, "{}", bare.body);
    assert!(
        bare.body.contains("did not come from this site"),
        "{}",
        bare.body
    );
    assert!(!signed_in(&bare));
    // The attacker's own token (from their visit to the page), which this
    // browser's cookie does not hold.
    let (mine, _) = c.login_token().await;
    let (_, theirs) = Client::new(&gw).login_token().await;
    let forged = post(Some(mine.clone()), Some(theirs)).await;
    assert_eq!(forged.status, 403);
    assert!(!signed_in(&forged));
    // A token in the form but no cookie (SameSite keeps it from a
    // cross-site post).
    let (_, token) = c.login_token().await;
    let no_cookie = post(None, Some(token)).await;
    assert_eq!(no_cookie.status, 403);
    // The page's own form: signed in.
    let (cookie, token) = c.login_token().await;
    let ours = post(Some(cookie), Some(token)).await;
    assert_eq!(ours.status, 303, "{}", ours.body);
    assert!(signed_in(&ours));
    // Empty is no token, even against an empty cookie.
    let empty = post(Some("flywheel_login=".into()), Some(String::new())).await;
    assert_eq!(empty.status, 403);
    // A second tab's page keeps the token the browser holds, so both work.
    let mut browser = Client::new(&gw);
    let (first_tab, token) = browser.login_token().await;
    browser.cookie = Some(first_tab.clone());
    let (second_tab, again) = browser.login_token().await;
    assert_eq!((second_tab, again), (first_tab, token));
    // A refusal hands out a fresh form to try again with.
    assert!(
        bare.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .starts_with("flywheel_login=")
    );
    assert!(bare.body.contains(r#"name="csrf" value=""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_is_http_only_strict_and_secure_behind_tls() {
    let gw = TestGateway::tiny().await;
    account(&gw, "ada", "admin").await;
    let mut c = Client::new(&gw);
    let r = c.login("ada", PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.headers[LOCATION], "/admin");
    let cookie = r.headers[SET_COOKIE].to_str().unwrap().to_string();
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/admin",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    let page = c.get("/admin").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("ada (admin)"));
    // The gateway's own health beside the database's.
    assert!(
        page.body.contains("0 waiting for Postgres"),
        "{}",
        page.body
    );
    assert!(page.body.contains("0 record(s) Postgres refused"));
    assert_eq!(page.headers["cache-control"], "no-store");
    let timing = page.headers["server-timing"].to_str().unwrap();
    let ms: f64 = timing.strip_prefix("app;dur=").unwrap().parse().unwrap();
    assert!(ms > 0.0, "{timing}");
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );

    let (login_cookie, csrf) = c.login_token().await;
    let behind_tls = c
        .send(
            c.http
                .post(format!("{}/admin/login", gw.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-forwarded-proto", "https")
                .header("cookie", login_cookie)
                .body(form(&[
                    ("username", "ada"),
                    ("password", PASSWORD),
                    ("csrf", &csrf),
                ])),
        )
        .await;
    assert_eq!(behind_tls.status, 303);
    assert!(
        behind_tls.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .ends_with("; Secure")
    );

    // Signing out ends the session on the server, not only in the browser.
    let csrf = c.csrf().await;
    let out = c.post("/admin/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(c.get("/admin").await.status, 303, "the old cookie is dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_bad_passwords_lock_the_account_even_for_the_right_one() {
    let gw = TestGateway::tiny().await;
    account(&gw, "bob", "admin").await;
    let mut c = Client::new(&gw);
    for i in 1..=4 {
        let r = c.login("bob", "wrong password").await;
        assert_eq!(r.status, 401, "attempt {i}");
        assert!(r.body.contains("wrong username or password"));
    }
    // An unknown name gets the same answer as a wrong password.
    assert_eq!(c.login("nobody", "wrong password").await.status, 401);
    let fifth = c.login("bob", "wrong password").await;
    assert_eq!(fifth.status, 429, "{}", fifth.body);
    let right = c.login("bob", PASSWORD).await;
    assert_eq!(right.status, 429, "locked, whatever the password");
    assert!(
        right.body.contains("locked for 5 more minute(s)"),
        "{}",
        right.body
    );
    let retry: u64 = right.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((290..=300).contains(&retry), "{retry}");
    assert!(c.cookie.is_none(), "no session while locked");
    // Another account is not locked with it.
    account(&gw, "carol", "admin").await;
    assert_eq!(c.login("carol", PASSWORD).await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_roll_back_need_the_csrf_token_a_reason_and_the_admin_role() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let base = gw.served.name.clone();
    let other = another_version(&gw, "tiny-b").await;
    account(&gw, "ada", "admin").await;
    account(&gw, "vic", "viewer").await;
    let mut admin = Client::new(&gw);
    admin.login("ada", PASSWORD).await;
    let csrf = admin.csrf().await;
    let promote = |csrf: &str, reason: &str, confirm: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("team".into(), "team-a".into()),
            ("model".into(), "tiny-b".into()),
            ("reason".into(), reason.into()),
            ("confirm".into(), confirm.into()),
        ]
    };
    let champion = || async {
        flywheel_store::models::team_champion(&gw.db.pool, team)
            .await
            .unwrap()
            .unwrap()
            .name
    };

    // Nothing to roll back yet: a clear 409 with the reason, not a 500.
    let r = send(
        &admin,
        "/admin/models/rollback",
        vec![
            ("csrf".into(), csrf.clone()),
            ("team".into(), "team-a".into()),
            ("reason".into(), "x".into()),
            ("confirm".into(), "yes".into()),
        ],
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body.contains("no promotion of this team is on record"),
        "{}",
        r.body
    );

    // No token, a token of another session, no reason, no confirmation:
    // refused, and nothing changes.
    let r = send(
        &admin,
        "/admin/models/promote",
        promote("", "better", "yes"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let mut viewer = Client::new(&gw);
    viewer.login("vic", PASSWORD).await;
    let viewer_csrf = viewer.csrf().await;
    assert_ne!(viewer_csrf, csrf);
    let r = send(
        &admin,
        "/admin/models/promote",
        promote(&viewer_csrf, "better", "yes"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = send(&admin, "/admin/models/promote", promote(&csrf, "  ", "yes")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("give a reason"));
    let r = send(
        &admin,
        "/admin/models/promote",
        promote(&csrf, "better", ""),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // A viewer with its own token may look, not act.
    let r = send(
        &viewer,
        "/admin/models/promote",
        promote(&viewer_csrf, "better", "yes"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("viewer role"));
    assert!(
        !viewer
            .get("/admin/models")
            .await
            .body
            .contains("/admin/models/promote")
    );
    assert_eq!(champion().await, base);
    assert!(
        flywheel_store::decisions::list(&gw.db.pool, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The real thing.
    let r = send(
        &admin,
        "/admin/models/promote",
        promote(&csrf, "wins on routing", "yes"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(champion().await, "tiny-b");
    let done = admin.get(r.headers[LOCATION].to_str().unwrap()).await;
    assert!(
        done.body
            .contains("tiny-b is now team team-a&#39;s champion"),
        "{}",
        done.body
    );
    let audit = admin.get("/admin/decisions?team=team-a").await;
    assert!(audit.body.contains("manual_promote"));
    assert!(audit.body.contains("wins on routing"));
    assert!(audit.body.contains("admin:ada"));
    let d = &flywheel_store::decisions::list(&gw.db.pool, Some(team), 1)
        .await
        .unwrap()[0];
    assert_eq!(
        (d.kind.as_str(), d.candidate_version_id, d.actor.as_str()),
        ("manual_promote", Some(other.id), "admin:ada")
    );

    // The JSON API: the token in a header.
    let api = |token: Option<&str>| {
        let mut req = admin
            .http
            .post(format!("{}/admin/api/rollback", gw.base))
            .json(&json!({"team": "team-a", "reason": "regressed on billing"}));
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        admin.send(req)
    };
    let r = api(None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let err: Value = serde_json::from_str(&r.body).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("CSRF"));
    let r = api(Some(&csrf)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(champion().await, base);
    let list: Vec<Value> =
        serde_json::from_str(&admin.get("/admin/api/decisions?team=team-a").await.body).unwrap();
    let kinds: Vec<&str> = list.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["manual_rollback", "manual_promote"]);
    assert_eq!(list[0]["reason"], "regressed on billing");
    let r = send(
        &admin,
        "/admin/models/promote",
        vec![
            ("csrf".into(), csrf.clone()),
            ("team".into(), "team-a".into()),
            ("model".into(), "no-such-model".into()),
            ("reason".into(), "x".into()),
            ("confirm".into(), "yes".into()),
        ],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

/// Chats and votes whose text is markup: none of it may reach a page as
/// markup.
const SCRIPT: &str = "<script>alert('pwned')</script>";
const IMG: &str = "\"><img src=x onerror=alert(1)>";

async fn hostile_traffic(gw: &TestGateway) -> (String, String) {
    let (_, evil_key) =
        flywheel_store::keys::create_key(&gw.db.pool, "<b>team</b><script>x()</script>")
            .await
            .unwrap();
    let (status, body) = gw
        .post(
            &evil_key,
            "/v1/chat/completions",
            json!({
                "model": gw.model(), "max_tokens": 4, "temperature": 0.0,
                "user": IMG,
                "messages": [{"role": "user", "content": format!("hello {SCRIPT} {IMG}")}],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let (status, body) = gw
        .post(
            &evil_key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "down", "user": IMG,
                   "comment": SCRIPT, "correction": IMG}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    (id, evil_key)
}

fn assert_escaped(page: &str, what: &str) {
    assert!(
        !page.contains("<script>"),
        "{what}: a script tag came through"
    );
    assert!(!page.contains("<img"), "{what}: an img tag came through");
    assert!(
        !page.contains("<b>team"),
        "{what}: markup in the team's name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markup_in_messages_votes_users_and_team_names_is_shown_escaped() {
    let gw = TestGateway::tiny().await;
    let (id, _) = hostile_traffic(&gw).await;
    flushed(&gw).await;
    let c = signed_in(&gw, "ada", "admin").await;
    let one = flywheel_tests::eventually(15, || async {
        let r = c.get(&format!("/admin/completions/{id}")).await;
        (r.status == 200 && r.body.contains("onerror")).then_some(r.body)
    })
    .await
    .expect("the completion and its vote in Postgres");
    assert_escaped(&one, "completion page");
    // As text, in entities.
    assert!(
        one.contains("&#60;script&#62;alert(&#39;pwned&#39;)&#60;/script&#62;"),
        "{one}"
    );
    assert!(
        one.contains("&#34;&#62;&#60;img src=x onerror=alert(1)&#62;"),
        "{one}"
    );
    for path in [
        "/admin".to_string(),
        "/admin/completions".to_string(),
        "/admin/teams".to_string(),
        "/admin/models".to_string(),
        format!("/admin/completions?q={}", "%3Cscript%3E"),
    ] {
        let r = c.get(&path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_escaped(&r.body, &path);
    }
    let list = c.get("/admin/completions?q=%3Cscript%3E").await.body;
    assert!(list.contains(&id), "the text search finds it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_filter_by_team_rating_version_and_text() {
    let gw = TestGateway::tiny().await;
    let up = gw.complete(&gw.key, Some("u1")).await;
    let down = gw.complete(&gw.key, Some("u2")).await;
    let unrated = gw.complete(&gw.key, Some("u3")).await;
    for (id, rating) in [(&up, "up"), (&down, "down")] {
        let (s, b) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": rating, "user": "r"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (_, other_key) = flywheel_store::keys::create_key(&gw.db.pool, "team-b")
        .await
        .unwrap();
    let other = gw.complete(&other_key, None).await;
    flushed(&gw).await;
    let c = signed_in(&gw, "ada", "viewer").await;
    let ids = |body: &str| -> Vec<String> {
        [&up, &down, &unrated, &other]
            .into_iter()
            .filter(|id| body.contains(id.as_str()))
            .cloned()
            .collect()
    };
    let cases: HashMap<&str, Vec<&String>> = HashMap::from([
        ("", vec![&up, &down, &unrated, &other]),
        ("team=team-a", vec![&up, &down, &unrated]),
        ("team=team-b", vec![&other]),
        ("team=team-a&rating=up", vec![&up]),
        ("team=team-a&rating=down", vec![&down]),
        ("team=team-a&rating=none", vec![&unrated]),
        ("until=2000-01-01", vec![]),
        ("q=no+such+text+anywhere", vec![]),
    ]);
    for (query, want) in cases {
        let body = flywheel_tests::eventually(15, || async {
            let r = c.get(&format!("/admin/completions?{query}")).await;
            assert_eq!(r.status, 200, "{query}: {}", r.body);
            (ids(&r.body).len() == want.len()).then_some(r.body)
        })
        .await
        .unwrap_or_else(|| panic!("{query}: wanted {want:?}"));
        let mut got = ids(&body);
        got.sort();
        let mut want: Vec<String> = want.into_iter().cloned().collect();
        want.sort();
        assert_eq!(got, want, "{query}");
    }
    let model = urlencode(gw.model());
    let body = c
        .get(&format!("/admin/completions?model={model}"))
        .await
        .body;
    assert_eq!(ids(&body).len(), 4, "every completion is the base's");
    for bad in [
        "rating=sideways",
        "since=yesterday",
        "team=nobody",
        "before=x",
    ] {
        let r = c.get(&format!("/admin/completions?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}

fn urlencode(s: &str) -> String {
    form(&[("x", s)])[2..].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_signs_in_sees_the_chart_opens_a_completion_promotes_and_rolls_back() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    another_version(&gw, "tiny-b").await;
    account(&gw, "ada", "admin").await;
    account(&gw, "locked", "admin").await;
    // Traffic for the charts: rated answers of the base.
    for i in 0..6 {
        let user = format!("user-{i}");
        let id = gw.complete(&gw.key, Some(&user)).await;
        let rating = if i % 3 == 0 { "down" } else { "up" };
        let (s, b) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": rating, "user": user}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (evil, _) = hostile_traffic(&gw).await;
    flushed(&gw).await;
    assert!(
        gw.wait_for_rows(6, |pool, team| async move {
            flywheel_store::feedback::count_for_team(&pool, team)
                .await
                .unwrap()
        })
        .await
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // Test artifacts (the README's screenshots come from scripts/demo-loop.sh
    // on the real model).
    let shots = root.join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = tokio::process::Command::new("node")
        .arg(root.join("browser/dashboard.mjs"))
        .current_dir(root.join("browser"))
        .env("BASE", &gw.base)
        .env("ADMIN_USER", "ada")
        .env("LOCK_USER", "locked")
        .env("PASSWORD", PASSWORD)
        .env("TEAM", "team-a")
        .env("CANDIDATE", "tiny-b")
        .env("BASE_MODEL", gw.model())
        .env("COMPLETION_ID", &evil)
        .env("SHOTS", &shots)
        .output()
        .await
        .expect("node runs (scripts/test.sh installs playwright-core and chromium)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{log}");
    assert!(out.status.success(), "the browser run failed:\n{log}");

    // What the browser did is what the database says.
    let decisions = flywheel_store::decisions::list(&gw.db.pool, Some(team), 10)
        .await
        .unwrap();
    let seen: Vec<(&str, &str, &str)> = decisions
        .iter()
        .map(|d| (d.kind.as_str(), d.reason.as_str(), d.actor.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "manual_rollback",
                "rolled back in the browser test",
                "admin:ada"
            ),
            (
                "manual_promote",
                "better on routing in the browser test",
                "admin:ada"
            ),
        ]
    );
    let champion = flywheel_store::models::team_champion(&gw.db.pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.name, gw.model());
    let locked = flywheel_store::admins::by_username(&gw.db.pool, "locked")
        .await
        .unwrap()
        .unwrap();
    assert!(locked.locked_until.unwrap() > chrono::Utc::now());
    for name in [
        "login",
        "overview",
        "overview-phone",
        "completions",
        "completion",
        "models",
        "decisions",
        "teams",
    ] {
        let png = shots.join(format!("{name}.png"));
        let bytes =
            std::fs::read(&png).unwrap_or_else(|_| panic!("{} was not written", png.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_only_routes_that_exist() {
    let gw = TestGateway::tiny().await;
    let c = signed_in(&gw, "ada", "admin").await;
    let doc: Value = serde_json::from_str(&c.get("/openapi.json").await.body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for want in [
        "/v1/chat/completions",
        "/v1/feedback",
        "/admin/api/promote",
        "/admin/api/rollback",
    ] {
        assert!(paths.contains_key(want), "{want}");
    }
    // Every answer of every operation has a schema, and every schema named
    // is defined (the dashboard's part names the gateway's `Error`).
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            for (status, answer) in op["responses"].as_object().unwrap() {
                let content = answer["content"].as_object();
                assert!(
                    content.is_some_and(|c| c.values().all(|m| m["schema"].is_object())),
                    "{method} {path} {status} has no schema"
                );
            }
        }
    }
    let text = doc.to_string();
    for name in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = name.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "{name} is named, not defined");
    }
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                gw.base,
                path.replace("{id}", "x")
                    .replace("{name}", "x")
                    .replace("{user}", "x")
            );
            let req = match method.as_str() {
                "get" => c.http.get(&url),
                "post" => c.http.post(&url).json(&json!({})),
                "delete" => c.http.delete(&url),
                other => panic!("{other}"),
            };
            let r = c.send(req.bearer_auth(&gw.key)).await;
            assert_ne!(r.status, 405, "{method} {path}");
            assert!(
                !(r.status == 404 && r.body.contains("no such route")),
                "{method} {path} is documented but not routed"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_the_teams_page_is_shown_once_works_and_is_revoked_there() {
    let gw = TestGateway::tiny().await;
    account(&gw, "ada", "admin").await;
    account(&gw, "vic", "viewer").await;
    let mut c = Client::new(&gw);
    c.login("ada", PASSWORD).await;
    let csrf = c.csrf().await;
    // The form's scope boxes: the ticked ones come back.
    let made = c
        .post(
            "/admin/teams/keys",
            &[
                ("csrf", &csrf),
                ("team", "search"),
                ("scope", "chat"),
                ("scope", "feedback"),
            ],
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let at = made
        .body
        .find(r#"<code id="secret">"#)
        .expect("the secret, once")
        + 18;
    let secret = made.body[at..].split('<').next().unwrap().to_string();
    let who = flywheel_store::keys::authenticate(&gw.db.pool, &secret)
        .await
        .unwrap()
        .expect("the key works");
    assert_eq!(who.team_name, "search");
    assert_eq!(who.scopes, vec![Scope::Chat, Scope::Feedback]);
    let later = c.get("/admin/teams").await;
    assert!(!later.body.contains(&secret), "shown once only");
    assert!(later.body.contains(&secret[..11]), "its prefix is listed");
    let prefix = &secret[..11];
    // Its scopes, set again on its row: only what is ticked.
    let r = c
        .post(
            "/admin/teams/keys/scopes",
            &[("csrf", &csrf), ("prefix", prefix), ("scope", "read")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let who = flywheel_store::keys::authenticate(&gw.db.pool, &secret)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who.scopes, vec![Scope::Read]);
    let row = c.get("/admin/teams").await.body;
    let row = &row[row.find(prefix).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains(r#"value="read" checked"#), "{row}");
    assert!(!row.contains(r#"value="chat" checked"#), "{row}");
    let r = c
        .post(
            "/admin/teams/keys/scopes",
            &[("csrf", &csrf), ("prefix", prefix)],
        )
        .await;
    assert_eq!(r.status, 400, "no scope ticked: {}", r.body);
    // The team's rate limits on its row; an empty box is no limit.
    let r = c
        .post(
            "/admin/teams/limits",
            &[
                ("csrf", &csrf),
                ("team", "search"),
                ("requests_per_minute", "90"),
                ("tokens_per_minute", ""),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let limits: (Option<i32>, Option<i32>) = sqlx::query_as(
        "select requests_per_minute, tokens_per_minute from teams where name = 'search'",
    )
    .fetch_one(&gw.db.pool)
    .await
    .unwrap();
    assert_eq!(limits, (Some(90), None));
    assert!(
        c.get("/admin/teams")
            .await
            .body
            .contains(r#"name="requests_per_minute" type="number" min="1" size="7" value="90""#),
        "the limit is shown in its box"
    );
    for bad in ["-3", "0", "lots"] {
        let r = c
            .post(
                "/admin/teams/limits",
                &[
                    ("csrf", &csrf),
                    ("team", "search"),
                    ("requests_per_minute", bad),
                ],
            )
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    // Privacy: store text off for the new team.
    let r = c
        .post(
            "/admin/teams/settings",
            &[("csrf", &csrf), ("team", "search")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let stored: bool = sqlx::query_scalar("select store_text from teams where name = 'search'")
        .fetch_one(&gw.db.pool)
        .await
        .unwrap();
    assert!(!stored);

    // A viewer may not make or revoke keys.
    let mut viewer = Client::new(&gw);
    viewer.login("vic", PASSWORD).await;
    let vcsrf = viewer.csrf().await;
    let r = viewer
        .post("/admin/teams/keys", &[("csrf", &vcsrf), ("team", "x")])
        .await;
    assert_eq!(r.status, 403);
    for (path, fields) in [
        (
            "/admin/teams/keys/scopes",
            [("prefix", prefix), ("scope", "chat")],
        ),
        (
            "/admin/teams/limits",
            [("team", "search"), ("requests_per_minute", "5")],
        ),
    ] {
        let mut fields = fields.to_vec();
        fields.push(("csrf", &vcsrf));
        assert_eq!(viewer.post(path, &fields).await.status, 403, "{path}");
    }
    let r = viewer
        .post(
            "/admin/teams/keys/revoke",
            &[("csrf", &vcsrf), ("prefix", prefix), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status, 403);
    // Unconfirmed: refused; confirmed: the key stops working.
    let r = c
        .post(
            "/admin/teams/keys/revoke",
            &[("csrf", &csrf), ("prefix", prefix)],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .post(
            "/admin/teams/keys/revoke",
            &[("csrf", &csrf), ("prefix", prefix), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(
        flywheel_store::keys::authenticate(&gw.db.pool, &secret)
            .await
            .unwrap()
            .is_none()
    );
    let again = c
        .post(
            "/admin/teams/keys/revoke",
            &[("csrf", &csrf), ("prefix", prefix), ("confirm", "yes")],
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
}

/// (requests, votes, up) of a team: from the chart's per-minute counts,
/// and counted in the log itself.
async fn chart_and_log(gw: &TestGateway, team: uuid::Uuid) -> ((i64, i64, i64), (i64, i64, i64)) {
    let chart: (i64, i64, i64) = sqlx::query_as(
        "select coalesce(sum(requests), 0)::int8, coalesce(sum(votes), 0)::int8,
                coalesce(sum(up), 0)::int8
         from traffic_minutes where team_id = $1",
    )
    .bind(team)
    .fetch_one(&gw.db.pool)
    .await
    .unwrap();
    let log: (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from completions where team_id = $1),
                (select count(*) from feedback where team_id = $1),
                (select count(*) from feedback where team_id = $1 and rating = 'up')",
    )
    .bind(team)
    .fetch_one(&gw.db.pool)
    .await
    .unwrap();
    (chart, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_counts_stay_equal_to_the_log_through_inserts_batches_and_deletions() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let mut ids = Vec::new();
    for user in ["ann", "ann", "bo", "cy"] {
        ids.push(gw.complete(&gw.key, Some(user)).await);
    }
    // One by one, and as a batch; two votes on one answer; a user's vote on
    // another user's answer.
    for (id, rating, user) in [
        (&ids[0], "up", "ann"),
        (&ids[0], "down", "bo"),
        (&ids[2], "up", "bo"),
    ] {
        let (s, b) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": rating, "user": user}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = gw
        .post(
            &gw.key,
            "/v1/feedback/batch",
            json!({"items": [
                {"completion_id": ids[1], "rating": "up", "user": "ann"},
                {"completion_id": ids[3], "rating": "down", "user": "cy"},
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    flushed(&gw).await;
    let (chart, log) = chart_and_log(&gw, team).await;
    assert_eq!(log, (4, 5, 3));
    assert_eq!(chart, log);
    // A user's data deleted: their answers, their votes, and the votes on
    // their answers.
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/users/ann/data", gw.base))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (chart, log) = chart_and_log(&gw, team).await;
    assert_eq!(
        log,
        (2, 2, 1),
        "bo's and cy's answers and the votes on them"
    );
    assert_eq!(chart, log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_makes_and_revokes_keys_sets_privacy_and_cancels_runs() {
    let gw = TestGateway::tiny().await;
    let c = signed_in(&gw, "ada", "admin").await;
    let csrf = c.csrf().await;
    let call = |path: &str, body: Value, token: Option<&str>| {
        let mut req = c.http.post(format!("{}{path}", gw.base)).json(&body);
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        c.send(req)
    };
    let r = call("/admin/api/keys", json!({"team": "search"}), None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call("/admin/api/keys", json!({"team": "search"}), Some(&csrf)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let made: Value = serde_json::from_str(&r.body).unwrap();
    let key = made["key"].as_str().unwrap();
    assert!(key.starts_with(made["prefix"].as_str().unwrap()));
    assert!(
        flywheel_store::keys::authenticate(&gw.db.pool, key)
            .await
            .unwrap()
            .is_some()
    );
    let r = call(
        "/admin/api/teams/settings",
        json!({"team": "search", "store_text": false, "share_for_training": true}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (store, share): (bool, bool) =
        sqlx::query_as("select store_text, share_for_training from teams where name = 'search'")
            .fetch_one(&gw.db.pool)
            .await
            .unwrap();
    assert_eq!((store, share), (false, true));
    // A key made with only some scopes, then given others.
    let r = call(
        "/admin/api/keys",
        json!({"team": "search", "scopes": ["feedback"]}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let narrow: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(narrow["scopes"], json!(["feedback"]));
    let who = |secret: String| {
        let pool = gw.db.pool.clone();
        async move {
            flywheel_store::keys::authenticate(&pool, &secret)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let narrow_key = narrow["key"].as_str().unwrap().to_string();
    assert_eq!(who(narrow_key.clone()).await.scopes, vec![Scope::Feedback]);
    let r = call(
        "/admin/api/keys/scopes",
        json!({"prefix": narrow["prefix"], "scopes": ["chat", "read"]}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        who(narrow_key.clone()).await.scopes,
        vec![Scope::Chat, Scope::Read]
    );
    for (bad, status) in [(json!([]), 400), (json!(["superuser"]), 422)] {
        let r = call(
            "/admin/api/keys/scopes",
            json!({"prefix": narrow["prefix"], "scopes": bad}),
            Some(&csrf),
        )
        .await;
        assert_eq!(r.status, status, "{bad}: {}", r.body);
    }
    // Rate limits; null is none.
    let r = call(
        "/admin/api/teams/limits",
        json!({"team": "search", "requests_per_minute": null, "tokens_per_minute": 20000}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let limits = who(narrow_key).await.limits;
    assert_eq!(
        (limits.requests_per_minute, limits.tokens_per_minute),
        (None, Some(20_000))
    );
    let r = call(
        "/admin/api/teams/limits",
        json!({"team": "nobody", "requests_per_minute": 5}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = call(
        "/admin/api/keys/revoke",
        json!({"prefix": made["prefix"]}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        flywheel_store::keys::authenticate(&gw.db.pool, key)
            .await
            .unwrap()
            .is_none()
    );
    let nobody = uuid::Uuid::new_v4();
    let r = call(
        &format!("/admin/api/runs/{nobody}/cancel"),
        json!({}),
        Some(&csrf),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let err: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing to cancel")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_shows_each_metric_with_its_interval_and_each_answer_pair_word_by_word() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let candidate = another_version(&gw, "tiny-b").await;
    let pool = &gw.db.pool;
    // The records an evaluation job writes (the job itself is tested in
    // promotion.rs); here, what the page makes of them.
    let id = flywheel_store::evals::create(
        pool,
        &flywheel_store::evals::NewEvaluation {
            team_id: Some(team),
            candidate_version_id: candidate.id,
            champion_version_id: gw.served.version_id,
            dataset_version_id: None,
            training_run_id: None,
        },
    )
    .await
    .unwrap();
    flywheel_store::evals::add_metrics(
        pool,
        id,
        &[flywheel_store::evals::Metric {
            suite: "general-retention".into(),
            metric: "pass_rate".into(),
            items: 2,
            candidate: 0.5,
            champion: 1.0,
            difference: -0.5,
            ci_low: -1.0,
            ci_high: 0.0,
        }],
    )
    .await
    .unwrap();
    let prompt = json!([{"role": "user", "content": "What is the capital of Nepal?"}]);
    let item = |model, output: &str, passed| flywheel_store::evals::Item {
        suite: "general-retention".into(),
        item: "capital-nepal".into(),
        model_version_id: model,
        prompt: prompt.clone(),
        output: output.into(),
        passed: Some(passed),
        score: None,
    };
    flywheel_store::evals::add_items(
        pool,
        id,
        &[
            item(
                candidate.id,
                "The capital of Nepal is Kathi <Nepal>.",
                false,
            ),
            item(
                gw.served.version_id,
                "The capital of Nepal is Kathmandu.",
                true,
            ),
        ],
    )
    .await
    .unwrap();
    flywheel_store::evals::finish(
        pool,
        id,
        Some(false),
        &json!(["FAIL: retention suite general-retention: difference -50.0 points"]),
        &json!({}),
        None,
    )
    .await
    .unwrap();
    // The team's judge, as the evaluation job keeps it.
    use flywheel_eval::judge::{PairVerdict, agreement};
    let check = agreement(&[PairVerdict::Chosen; 12], &[], 0.6);
    let weight_shown = format!(
        "<th scope=\"row\">Weight in the gate</th><td>{:.2}</td>",
        check.weight()
    );
    let judge = flywheel_jobs::judge::InEvaluation {
        judge: "judge-7b".into(),
        weight: check.weight(),
        reason: check.reason.clone(),
        check: Some(check),
        verdicts: Some(flywheel_jobs::judge::Tally {
            prompts: 20,
            candidate: 12,
            champion: 1,
            ties: 6,
            inconsistent: 1,
        }),
        questions: 64,
        tokens: 5120,
    };
    flywheel_store::evals::set_judge(pool, id, &serde_json::to_value(&judge).unwrap())
        .await
        .unwrap();
    let c = signed_in(&gw, "ada", "viewer").await;
    let page = c.get(&format!("/admin/evaluations/{id}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("tiny-b against tiny"), "{}", page.body);
    for shown in [
        "judge-7b: <strong>counted in the gate</strong>",
        "agrees with the users on 12 of 12 consistent preferences",
        weight_shown.as_str(),
        "100% (95% interval 76% to 100%), bar 60%",
        "20 prompts: the candidate&#39;s answer 12, the champion&#39;s 1, tie 6, inconsistent 1",
        "64 questions, 5120 tokens",
    ] {
        assert!(page.body.contains(shown), "{shown}\n{}", page.body);
    }
    assert!(page.body.contains("failed the gate"));
    assert!(page.body.contains("[-1.000, 0.000]"), "the interval");
    assert!(
        page.body
            .contains("FAIL: retention suite general-retention")
    );
    // Only the words that differ are marked, escaped.
    assert!(
        page.body
            .contains("The capital of Nepal is <ins>Kathi &#60;Nepal&#62;.</ins>"),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("The capital of Nepal is <del>Kathmandu.</del>")
    );
    let list = c.get("/admin/evaluations").await;
    assert!(list.body.contains(&format!("/admin/evaluations/{id}")));
    for empty in ["/admin/runs", "/admin/datasets"] {
        assert_eq!(c.get(empty).await.status, 200, "{empty}");
    }
    let missing = c
        .get(&format!("/admin/evaluations/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_page_draws_the_loops_table_with_the_moves_it_took() {
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    let team = gw.team_id().await;
    let queue = flywheel_jobs::stages::JobQueue::default();
    let cfg = flywheel_tests::tiny_loop::loop_config();
    let id = flywheel_loop::cycle::start(
        pool,
        &queue,
        team,
        flywheel_store::cycles::Trigger::Manual,
        &cfg,
    )
    .await
    .unwrap()
    .unwrap();
    let c = signed_in(&gw, "vic", "viewer").await;
    // Running, at curation: that stage is the one outlined.
    let r = c.get(&format!("/admin/cycles/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(r#"<svg class="loop-table""#), "{}", r.body);
    assert_eq!(r.body.matches("<line ").count(), flywheel_loop::TABLE.len());
    assert!(
        r.body.contains(r#"class="stage here" x="85""#),
        "{}",
        r.body
    );
    // Curation found no votes: the loop skipped, and the page says so.
    flywheel_loop::cycle::curated(pool, &queue, id, None)
        .await
        .unwrap();
    let r = c.get(&format!("/admin/cycles/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.matches(r#"class="move taken""#).count(), 1);
    assert!(
        r.body.contains("the team has no feedback yet"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("<td>curate</td><td>skip</td>"),
        "{}",
        r.body
    );
    // The overview links each recent cycle to its page.
    let overview = c.get("/admin").await;
    assert!(
        overview.body.contains(&format!("/admin/cycles/{id}")),
        "{}",
        overview.body
    );
}
