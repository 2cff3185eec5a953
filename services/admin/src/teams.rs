//! Teams and keys: every team with its privacy settings and its API keys
//! (prefixes only: a key's secret is shown once, when it is made).

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use flywheel_store::dashboard::TeamRow;
use flywheel_store::keys::KeyInfo;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, when};

#[derive(Template)]
#[template(path = "teams.html")]
struct TeamsPage {
    chrome: Chrome,
    teams: Vec<TeamRow>,
    keys: Vec<KeyInfo>,
}

impl TeamsPage {
    fn when(&self, t: &chrono::DateTime<chrono::Utc>) -> String {
        when(t)
    }
    fn maybe_when(&self, t: &Option<chrono::DateTime<chrono::Utc>>) -> String {
        maybe_when(t)
    }
}

pub async fn page(
    State(state): State<AdminState>,
    signed: Signed,
) -> Result<Html<String>, AdminError> {
    let page = TeamsPage {
        chrome: Chrome::new(&signed, "teams"),
        teams: flywheel_store::dashboard::teams(&state.pool).await?,
        keys: flywheel_store::keys::list_keys(&state.pool, None).await?,
    };
    Ok(Html(page.render()?))
}
