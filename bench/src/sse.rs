//! A Server-Sent Events reader for the queue phase's streams: one TCP connection per
//! stream (as a browser holds it), the answer's head parsed with `httparse`, a chunked
//! body undone as it arrives, and events (`event:` / `data:` lines up to a blank line)
//! handed out one at a time. Comment lines (the gateway's keep-alive) are skipped.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::Client;

/// One event: its `event:` name ("message" when absent) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

pub struct EventStream {
    stream: TcpStream,
    /// Bytes read, still chunk-encoded.
    raw: BytesMut,
    /// The body, decoded, not yet handed out as events.
    data: BytesMut,
    chunked: bool,
    /// Bytes of the current chunk still to move into `data`.
    chunk_left: usize,
    /// The CRLF after a chunk still to skip.
    skip: usize,
    /// The last chunk arrived: the server ended the stream.
    ended: bool,
}

const MAX_HEAD_BYTES: usize = 16 * 1024;

impl EventStream {
    /// Opens `path` with the user's `token`; Err(why) unless the answer is a 200.
    pub async fn open(client: &Client, path: &str, token: &str) -> Result<EventStream, String> {
        let (addr, authority, prefix) = client.target();
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let request = format!(
            "GET {prefix}{path} HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = BytesMut::with_capacity(2048);
        let (status, chunked, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&raw) {
                Ok(httparse::Status::Complete(n)) => {
                    let chunked = response.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("transfer-encoding")
                            && h.value.eq_ignore_ascii_case(b"chunked")
                    });
                    break (response.code.unwrap_or(0), chunked, n);
                }
                Ok(httparse::Status::Partial) if raw.len() < MAX_HEAD_BYTES => {
                    match stream.read_buf(&mut raw).await {
                        Ok(0) => return Err("closed before the answer".into()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("receive: {e}")),
                    }
                }
                _ => return Err("bad answer".into()),
            }
        };
        raw.advance(head_len);
        let mut events = EventStream {
            stream,
            raw,
            data: BytesMut::new(),
            chunked,
            chunk_left: 0,
            skip: 0,
            ended: false,
        };
        if status != 200 {
            // Whatever body came with the head says why.
            events.decode();
            let body = String::from_utf8_lossy(&events.data[..events.data.len().min(200)]);
            return Err(format!("{status} {body}"));
        }
        events.decode();
        Ok(events)
    }

    /// The next event; None when the server ended the stream or closed the connection.
    pub async fn next(&mut self) -> Result<Option<Event>, String> {
        loop {
            if let Some(event) = self.take_event() {
                if event.name.is_empty() && event.data.is_empty() {
                    continue; // only comments
                }
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            if self.raw.capacity() - self.raw.len() < 1024 {
                self.raw.reserve(4096);
            }
            match self.stream.read_buf(&mut self.raw).await {
                Ok(0) => return Ok(None),
                Ok(_) => self.decode(),
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }

    /// Moves what `raw` holds of the body into `data`, undoing the chunks.
    fn decode(&mut self) {
        if !self.chunked {
            let all = self.raw.split();
            self.data.extend_from_slice(&all);
            return;
        }
        loop {
            if self.chunk_left > 0 {
                let n = self.chunk_left.min(self.raw.len());
                if n == 0 {
                    return;
                }
                self.data.extend_from_slice(&self.raw[..n]);
                self.raw.advance(n);
                self.chunk_left -= n;
                if self.chunk_left == 0 {
                    self.skip = 2;
                }
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(self.raw.len());
                if n == 0 {
                    return;
                }
                self.raw.advance(n);
                self.skip -= n;
                continue;
            }
            let Some(at) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = String::from_utf8_lossy(&self.raw[..at]).to_string();
            self.raw.advance(at + 2);
            let size =
                usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
            if size == 0 {
                self.ended = true;
                return;
            }
            self.chunk_left = size;
        }
    }

    /// The first complete event in `data` (a block ended by a blank line), if any.
    fn take_event(&mut self) -> Option<Event> {
        let (end, sep) = find_blank_line(&self.data)?;
        let block = self.data.split_to(end + sep);
        let text = String::from_utf8_lossy(&block[..end]);
        let mut event = Event {
            name: String::new(),
            data: String::new(),
        };
        let mut has_data = false;
        for line in text.lines() {
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => event.name = value.to_string(),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {} // a comment (""), id, retry
            }
        }
        if has_data && event.name.is_empty() {
            event.name = "message".into();
        }
        Some(event)
    }
}

/// Where the first event of `data` ends, and the length of the blank line after it.
fn find_blank_line(data: &[u8]) -> Option<(usize, usize)> {
    let lf = data.windows(2).position(|w| w == b"\n\n").map(|at| (at, 2));
    let crlf = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Target;
    use std::time::Duration;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn reads_events_split_across_chunks_and_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = socket.read(&mut buf).await.unwrap();
            let mut body = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for chunk in [
                "event: ticket\ndata: {\"state\":\"wa",
                "iting\"}\n\n:\n\n",
                "event: ticket\ndata: {\"state",
                "\":\"sold_out\"}\n\n",
            ] {
                body.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
            }
            body.extend_from_slice(b"0\r\n\r\n");
            // Cut anywhere: the reader must not care where reads end.
            let body: Vec<&[u8]> = body.chunks(7).collect();
            for piece in body {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let target = Target {
            authority: addr.to_string(),
            port: addr.port(),
            prefix: String::new(),
        };
        let client = Client::new(&target, "svc", Duration::from_secs(5))
            .await
            .unwrap();
        let mut events = EventStream::open(&client, "/s", "t").await.unwrap();
        let first = events.next().await.unwrap().unwrap();
        assert_eq!(first.name, "ticket");
        assert_eq!(first.data, r#"{"state":"waiting"}"#);
        let second = events.next().await.unwrap().unwrap();
        assert_eq!(second.data, r#"{"state":"sold_out"}"#);
        assert_eq!(events.next().await.unwrap(), None);
    }
}
