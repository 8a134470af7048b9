//! What sits between the subscribers and the server in a variant: qiod, websocat, or
//! nothing (direct), and the subscribers each variant has.

use crate::client::{LineConn, WsConn};
use crate::daemon::Daemon;
use crate::websocat::{self, Websocat};
use crate::{Ctx, Variant};
use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::time::Duration;

/// Connections being set up at once.
const CONNECT_PARALLEL: usize = 64;

/// The process in the middle of a variant.
pub enum Middle {
    /// qiod.
    Qiod(Daemon),
    /// websocat's broadcast overlay.
    Websocat(Websocat),
    /// Direct connections: nothing in between.
    None,
}

impl Middle {
    /// Starts what `variant` puts in front of the server at `url`.
    pub async fn start(ctx: &Ctx, variant: Variant, url: &str) -> anyhow::Result<Middle> {
        Ok(match variant {
            Variant::Qiod => Middle::Qiod(ctx.launcher.start(url).await?),
            Variant::Websocat => {
                let l = ctx
                    .websocat
                    .as_ref()
                    .context("the websocat variant needs --websocat PATH")?;
                Middle::Websocat(l.start(url).await?)
            }
            Variant::Direct => Middle::None,
        })
    }

    /// Its CPU time so far; `None` for direct.
    pub fn cpu(&self) -> anyhow::Result<Option<Duration>> {
        match self {
            Middle::Qiod(d) => d.cpu().map(Some),
            Middle::Websocat(w) => w.cpu().map(Some),
            Middle::None => Ok(None),
        }
    }

    /// Whether its CPU time is part of the harness's own (qiod run in-process).
    pub fn in_harness(&self) -> bool {
        matches!(self, Middle::Qiod(d) if d.pid().is_none())
    }

    /// Its log, for error reports.
    pub fn log(&self) -> String {
        match self {
            Middle::Qiod(d) => d.log(),
            Middle::Websocat(w) => w.log(),
            Middle::None => String::new(),
        }
    }

    /// Stops it.
    pub async fn stop(self) {
        match self {
            Middle::Qiod(d) => d.stop().await,
            Middle::Websocat(w) => w.stop().await,
            Middle::None => {}
        }
    }

    /// How many subscriptions the server should hold for `n` subscribers.
    pub fn upstream_subscriptions(&self, n: usize) -> usize {
        match self {
            Middle::None => n,
            _ => 1,
        }
    }

    /// `n` subscribers of `path`, each subscribed (through the middle, or directly).
    pub async fn subscribers(&self, url: &str, n: usize, path: &str) -> anyhow::Result<Vec<Sub>> {
        match self {
            Middle::Websocat(w) => Ok(websocat::subscribers(w, n, path)
                .await?
                .into_iter()
                .map(Sub::Raw)
                .collect()),
            Middle::Qiod(d) => {
                let socket = d.socket().to_owned();
                connect_parallel(n, move || {
                    let socket = socket.clone();
                    async move {
                        Ok(Sub::Local(
                            LineConn::subscribed(&socket, 16 * 1024, path).await?,
                        ))
                    }
                })
                .await
            }
            Middle::None => {
                connect_parallel(n, move || {
                    let url = url.to_owned();
                    async move {
                        let mut ws = WsConn::connect(&url).await?;
                        ws.subscribe(path, 1).await?;
                        Ok(Sub::Direct(Box::new(ws)))
                    }
                })
                .await
            }
        }
    }
}

/// Runs `connect` `n` times, [`CONNECT_PARALLEL`] at a time.
async fn connect_parallel<F, Fut>(n: usize, connect: F) -> anyhow::Result<Vec<Sub>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Sub>>,
{
    let mut subs = Vec::with_capacity(n);
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while subs.len() < n {
        while next < n && pending.len() < CONNECT_PARALLEL {
            next += 1;
            pending.push(connect());
        }
        match pending.next().await {
            Some(res) => subs.push(res?),
            None => bail!("connecting subscribers: none left pending"),
        }
    }
    Ok(subs)
}

/// One subscriber.
pub enum Sub {
    /// A local client of qiod (line JSON).
    Local(LineConn),
    /// A direct WebSocket.
    Direct(Box<WsConn>),
    /// A local client of websocat (the server's raw frames, one per line).
    Raw(LineConn),
}
