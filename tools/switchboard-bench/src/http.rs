//! A small keep-alive HTTP/1.1 client for the control API callers of
//! `cross-node` and the publishers of `fanout`: one request at a time per
//! connection, `Content-Length` or chunked answers, bounded sizes.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest HTTP answer head / body accepted.
const MAX_HEAD: usize = 64 << 10;
const MAX_BODY: usize = 64 << 20;

/// A keep-alive HTTP/1.1 client connection (one request at a time), enough
/// for the control API's JSON answers: `Content-Length` or chunked bodies.
/// Reconnects after an error or `Connection: close`.
#[derive(Debug)]
pub(crate) struct HttpConn {
    addr: SocketAddr,
    /// `Content-Type` of the request bodies.
    content_type: &'static str,
    stream: Option<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    /// A connection to `addr`, opened at the first request.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            content_type: "application/json",
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends bodies with this `Content-Type` instead of `application/json`.
    pub(crate) fn with_content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    /// Drops the connection; the next request opens a new one.
    pub(crate) fn reset(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// `POST path` with a body; returns the status and body.
    pub(crate) async fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let r = self.exchange(path, body).await;
        if r.is_err() {
            self.reset();
        }
        r
    }

    async fn exchange(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect to {}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let Self {
            addr,
            content_type,
            stream,
            buf,
        } = self;
        let s = stream.as_mut().expect("connected above");
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
        // Each loop below ends, fails at end-of-file, or fails at its size bound.
        let head_end = loop {
            if let Some(p) = find(buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err("answer head too large".into());
            }
            read_more(s, buf).await?;
        };
        let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "answer head is not UTF-8")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("malformed status line")?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        buf.drain(..head_end);
        let out = if chunked {
            let mut out = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = find(buf, b"\r\n") {
                        break p;
                    }
                    if buf.len() > MAX_HEAD {
                        return Err("chunk size line too long".into());
                    }
                    read_more(s, buf).await?;
                };
                let size_text = std::str::from_utf8(&buf[..line_end]).unwrap_or("");
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| format!("bad chunk size {size_text:?}"))?;
                if out.len() + size > MAX_BODY {
                    return Err("answer body too large".into());
                }
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    read_more(s, buf).await?;
                }
                out.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
                if size == 0 {
                    break out;
                }
            }
        } else if let Some(n) = len {
            if n > MAX_BODY {
                return Err("answer body too large".into());
            }
            while buf.len() < n {
                read_more(s, buf).await?;
            }
            buf.drain(..n).collect()
        } else {
            // Neither: the body ends with the connection.
            close = true;
            while buf.len() <= MAX_BODY {
                match s.read_buf(buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            std::mem::take(buf)
        };
        if close {
            self.reset();
        }
        Ok((status, out))
    }
}

/// Reads what is available into `buf`; end-of-file is an error.
async fn read_more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    match s.read_buf(buf).await {
        Ok(0) => Err("connection closed by the server".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_client_reads_length_and_chunked_answers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                for answer in [
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi".to_owned(),
                    "HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_owned(),
                ] {
                    // One request per answer (the body ends the request).
                    while !got.ends_with(b"{}") {
                        let mut b = [0u8; 1024];
                        let n = s.read(&mut b).await.unwrap();
                        got.extend_from_slice(&b[..n]);
                    }
                    got.clear();
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
            });
            let mut c = HttpConn::new(addr);
            assert_eq!(c.post("/x", b"{}").await.unwrap(), (200, b"hi".to_vec()));
            assert_eq!(
                c.post("/y", b"{}").await.unwrap(),
                (404, b"abcde".to_vec())
            );
        });
    }
}
