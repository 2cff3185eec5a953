//! The dashboard as a test drives it without a browser: accounts, a client
//! that signs in and keeps its session cookie (following no redirect), and
//! forms.

use reqwest::header::{HeaderMap, SET_COOKIE};

use crate::gateway::TestGateway;

pub const PASSWORD: &str = "correct horse battery";

pub async fn account(gw: &TestGateway, name: &str, role: &str) {
    let hash = flywheel_admin::hash_password(PASSWORD).unwrap();
    flywheel_store::admins::upsert(&gw.db.pool, name, &hash, role)
        .await
        .unwrap();
}

/// Waits until everything the gateway acknowledged is in Postgres.
pub async fn flushed(gw: &TestGateway) {
    assert!(
        gw.state
            .journal()
            .wait_flushed(std::time::Duration::from_secs(10))
            .await
    );
}

/// A new account `name` with `role`, signed in.
pub async fn signed_in(gw: &TestGateway, name: &str, role: &str) -> Client {
    account(gw, name, role).await;
    let mut c = Client::new(gw);
    let r = c.login(name, PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    c
}

pub fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A browser-less admin: follows no redirect, keeps the session cookie.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub cookie: Option<String>,
}

pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Client {
    pub fn new(gw: &TestGateway) -> Self {
        Self::at(&gw.base)
    }

    /// A client of the dashboard at `base`.
    pub fn at(base: &str) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c),
            None => req,
        };
        let r = req.send().await.unwrap();
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Resp {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(fields)),
        )
        .await
    }

    /// What the sign-in page gives a browser: its CSRF cookie (`name=value`)
    /// and the same token in its form.
    pub async fn login_token(&self) -> (String, String) {
        let page = self.get("/admin/login").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let cookie = page.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let at = page
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a csrf field")
            + 19;
        (cookie, page.body[at..at + 64].to_string())
    }

    /// Signs in through the sign-in form, as a browser does.
    pub async fn login(&mut self, user: &str, password: &str) -> Resp {
        let (cookie, csrf) = self.login_token().await;
        let r = self
            .send(
                self.http
                    .post(format!("{}/admin/login", self.base))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("cookie", cookie)
                    .body(form(&[
                        ("username", user),
                        ("password", password),
                        ("next", "/admin"),
                        ("csrf", &csrf),
                    ])),
            )
            .await;
        // The session's cookie (a refusal sends only a fresh form's).
        if let Some(pair) = r
            .headers
            .get_all(SET_COOKIE)
            .iter()
            .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string())
            .find(|pair| pair.starts_with("flywheel_admin="))
        {
            self.cookie = Some(pair);
        }
        r
    }

    /// The CSRF token the pages carry for this session.
    pub async fn csrf(&self) -> String {
        let page = self.get("/admin/models").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let at = page
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a csrf field")
            + 19;
        page.body[at..at + 64].to_string()
    }
}
