//! The identd (RFC 1413) side of the connections: which of our sockets is which user.
//!
//! Every connection registers its (local port, server port) and user name for as long as its
//! socket lives; [`serve`] answers servers' ident queries from that table. Servers ask right
//! after accepting a connection, before registration, so entries exist from the moment the
//! TCP connection is up.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

/// (our port, server port) → user name.
static TABLE: LazyLock<Mutex<HashMap<(u16, u16), String>>> = LazyLock::new(Mutex::default);

fn table() -> std::sync::MutexGuard<'static, HashMap<(u16, u16), String>> {
    TABLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A socket's entry; removed when dropped.
#[derive(Debug)]
pub struct Entry {
    key: (u16, u16),
}

impl Entry {
    /// Registers `username` for the socket from our `local_port` to the server's `remote_port`.
    pub fn new(local_port: u16, remote_port: u16, username: &str) -> Self {
        let key = (local_port, remote_port);
        table().insert(key, username.to_owned());
        Self { key }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        table().remove(&self.key);
    }
}

/// The answer to one query line (`6193, 23`), without the CRLF.
pub fn answer(query: &str) -> String {
    let parsed = query
        .trim()
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    let Some((ours, theirs)) = parsed.filter(|(a, b)| *a != 0 && *b != 0) else {
        return "0, 0 : ERROR : INVALID-PORT".to_owned();
    };
    match table().get(&(ours, theirs)) {
        Some(user) => format!("{ours}, {theirs} : USERID : UNIX : {user}"),
        None => format!("{ours}, {theirs} : ERROR : NO-USER"),
    }
}

/// Serves ident queries on `listener` until `shutdown`: one query per connection, 10 s to ask.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "identd accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 1000));
            let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line));
            if !matches!(read.await, Ok(Ok(n)) if n > 0) {
                return;
            }
            let reply = answer(&line);
            tracing::debug!(%peer, query = line.trim(), reply, "ident query");
            let _ = write.write_all(format!("{reply}\r\n").as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let _e = Entry::new(40001, 6667, "alice");
        assert_eq!(answer("40001 , 6667\r\n"), "40001, 6667 : USERID : UNIX : alice");
        assert_eq!(answer("40001,6667"), "40001, 6667 : USERID : UNIX : alice");
        assert_eq!(answer("40002, 6667"), "40002, 6667 : ERROR : NO-USER");
        assert_eq!(answer("garbage"), "0, 0 : ERROR : INVALID-PORT");
        assert_eq!(answer("0, 6667"), "0, 0 : ERROR : INVALID-PORT");
        assert_eq!(answer("99999, 1"), "0, 0 : ERROR : INVALID-PORT");
        drop(_e);
        assert_eq!(answer("40001, 6667"), "40001, 6667 : ERROR : NO-USER");
    }
}
