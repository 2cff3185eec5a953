//! A TCP proxy in front of a server, which a test can stop: the server out
//! of reach for whoever connects through the proxy (connections cut, new
//! ones refused), as a network fault makes it, while the server itself goes
//! on serving every other test.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    stop: watch::Sender<bool>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = watch::channel(false);
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            let mut on_stop = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    _ = on_stop.wait_for(|s| *s) => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let (upstream, mut stopped) = (upstream.clone(), stopped.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, stop }
    }

    /// A proxy to the server of database URL `db` (`postgres://...@host:port/name`).
    pub async fn for_database(db: &str) -> Self {
        let server = db
            .split_once('@')
            .map_or(db, |(_, r)| r)
            .split('/')
            .next()
            .unwrap();
        Self::start(server).await
    }

    /// `url` (a `postgres://` URL) with its host and port this proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (auth, rest) = match rest.split_once('@') {
            Some((a, r)) => (format!("{a}@"), r),
            None => (String::new(), rest),
        };
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        format!("{scheme}://{auth}127.0.0.1:{}/{path}", self.port)
    }

    /// Cuts every connection and refuses new ones.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}
