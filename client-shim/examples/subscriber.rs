//! Prints the events of the paths given (default: `/clienttest/broadcast`), and what
//! happens to the connections, until Ctrl-C. Answers the server's requests with "ok".
//!
//! ```sh
//! cargo run -p qio-testserver                                  # prints its ws:// address
//! cargo run -p qiod -- --server ws://127.0.0.1:PORT/ --socket /tmp/qiod-test/qiod.sock
//! QIOD_SOCKET=/tmp/qiod-test/qiod.sock cargo run -p qio-client --example subscriber -- /clienttest/broadcast
//! ```
//! Restart qiod meanwhile: the example keeps its subscription and reports the gap.

use futures_util::StreamExt;
use qio_client::{Client, ConnectionEvent};

#[tokio::main]
async fn main() -> Result<(), qio_client::Error> {
    let mut paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        paths.push("/clienttest/broadcast".into());
    }
    let client = Client::connect().await?;
    let mut events = client.events();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                ConnectionEvent::DaemonGone { reason } => eprintln!("qiod went away: {reason}"),
                ConnectionEvent::DaemonBack {
                    after,
                    resubscribed,
                } => {
                    eprintln!("qiod back after {after:?}; {resubscribed} path(s) subscribed again")
                }
                other => eprintln!("connection: {other:?}"),
            }
        }
    });
    let mut subs = Vec::new();
    for path in &paths {
        subs.push(client.on(path).await?);
    }
    let mut all = futures_util::stream::select_all(subs);
    loop {
        tokio::select! {
            ev = all.next() => {
                let Some(mut ev) = ev else { break };
                println!("{} {}", ev.path, ev.data);
                if ev.cb.is_some() {
                    ev.answer("ok").await?;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}
