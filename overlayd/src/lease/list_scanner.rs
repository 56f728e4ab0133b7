//! A Kubernetes list response, taken apart as it arrives: each element of
//! `items` is handed out as soon as its last byte is in, and then dropped,
//! so a list is never held whole. A list from the API server's watch cache
//! (`resourceVersion=0`) comes in one response whatever its size: 5,000 real
//! Nodes are ~45 MB of JSON, where one Node is ~9 KiB. Pure: fed bytes,
//! unit-tested with every way of cutting them.

/// Why a list response could not be taken apart.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScanError {
    /// Not a JSON object of the list's shape.
    #[error("list response is not a JSON object with items: {0}")]
    Shape(&'static str),
    /// `metadata` did not parse.
    #[error("list metadata: {0}")]
    Metadata(String),
}

/// Where the scanner stands in the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Before the opening brace.
    Start,
    /// A key (or the closing brace).
    Key,
    /// The value of the key just read.
    Value,
    /// A comma or the closing brace, after a value.
    Next,
    /// After the closing brace.
    Done,
}

/// Takes a list response apart: [`feed`](ListScanner::feed) it bytes, get items.
#[derive(Debug)]
pub struct ListScanner {
    /// Bytes kept: from the start of what is still being read (a key, an
    /// item, the metadata) to the end of what arrived.
    buf: Vec<u8>,
    /// Next byte of `buf` to look at.
    at: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect: Expect,
    /// The key whose value is being read.
    key: Vec<u8>,
    /// Where in `buf` a top-level key string starts.
    key_start: Option<usize>,
    /// Where in `buf` the item (in `items`) or the `metadata` value being read starts.
    capture_start: Option<usize>,
    resource_version: Option<String>,
}

impl Default for ListScanner {
    fn default() -> Self {
        ListScanner {
            buf: Vec::new(),
            at: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            expect: Expect::Start,
            key: Vec::new(),
            key_start: None,
            capture_start: None,
            resource_version: None,
        }
    }
}

impl ListScanner {
    /// Takes in the next bytes of the response; calls `item` with each
    /// element of `items` completed by them (its JSON text).
    pub fn feed(&mut self, bytes: &[u8], mut item: impl FnMut(&[u8])) -> Result<(), ScanError> {
        self.buf.extend_from_slice(bytes);
        while self.at < self.buf.len() {
            let b = self.buf[self.at];
            let here = self.at;
            self.at += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 1 && self.expect == Expect::Key {
                        let start = self.key_start.take().ok_or(ScanError::Shape("a key without a start"))?;
                        self.key = self.buf[start + 1..here].to_vec();
                    }
                }
                continue;
            }
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => {}
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 {
                        match self.expect {
                            Expect::Key => self.key_start = Some(here),
                            Expect::Value => self.expect = Expect::Next,
                            _ => return Err(ScanError::Shape("a string where none belongs")),
                        }
                    }
                }
                b':' if self.depth == 1 => {
                    if self.expect != Expect::Key {
                        return Err(ScanError::Shape("a colon where none belongs"));
                    }
                    self.expect = Expect::Value;
                }
                b',' if self.depth == 1 => self.expect = Expect::Key,
                b'{' | b'[' => {
                    match (self.depth, self.expect) {
                        (0, Expect::Start) if b == b'{' => self.expect = Expect::Key,
                        (0, _) => return Err(ScanError::Shape("not an object")),
                        (1, Expect::Value) => {
                            self.expect = Expect::Next;
                            if self.key == b"metadata" {
                                self.capture_start = Some(here);
                            } else if self.key == b"items" && b != b'[' {
                                return Err(ScanError::Shape("items is not an array"));
                            }
                        }
                        (2, _) if self.key == b"items" => self.capture_start = Some(here),
                        _ => {}
                    }
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.checked_sub(1).ok_or(ScanError::Shape("unbalanced brackets"))?;
                    match self.depth {
                        0 => self.expect = Expect::Done,
                        1 if self.key == b"metadata" => {
                            if let Some(start) = self.capture_start.take() {
                                self.resource_version = resource_version(&self.buf[start..self.at])?;
                            }
                        }
                        2 if self.key == b"items" => {
                            if let Some(start) = self.capture_start.take() {
                                item(&self.buf[start..self.at]);
                            }
                        }
                        _ => {}
                    }
                }
                _ if self.depth == 1 && self.expect == Expect::Value => self.expect = Expect::Next,
                _ => {}
            }
        }
        self.compact();
        Ok(())
    }

    /// Drops what is read and no longer needed.
    fn compact(&mut self) {
        let keep = self.capture_start.or(self.key_start).unwrap_or(self.at);
        if keep == 0 {
            return;
        }
        self.buf.drain(..keep);
        self.at -= keep;
        self.capture_start = self.capture_start.map(|s| s - keep);
        self.key_start = self.key_start.map(|s| s - keep);
    }

    /// The list's resourceVersion, once the response is complete.
    pub fn finish(self) -> Result<String, ScanError> {
        if self.expect != Expect::Done {
            return Err(ScanError::Shape("the response ended early"));
        }
        self.resource_version.ok_or(ScanError::Shape("no metadata.resourceVersion"))
    }

    /// Bytes held now: at most one item (or the metadata) and the last chunk.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

fn resource_version(metadata: &[u8]) -> Result<Option<String>, ScanError> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "resourceVersion")]
        resource_version: Option<String>,
    }
    let meta: Meta = serde_json::from_slice(metadata).map_err(|e| ScanError::Metadata(e.to_string()))?;
    Ok(meta.resource_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Result<(Vec<String>, String), ScanError> {
        let mut s = ListScanner::default();
        let mut items = Vec::new();
        for chunk in chunks {
            s.feed(chunk, |i| items.push(String::from_utf8_lossy(i).into_owned()))?;
        }
        Ok((items, s.finish()?))
    }

    const LIST: &str = r#"{"apiVersion":"v1","items":[{"metadata":{"name":"a","annotations":{"x":"}]\"{"}}},{"metadata":{"name":"b"},"spec":{"podCIDRs":["10.0.0.0/24"]}}],"kind":"NodeList","metadata":{"resourceVersion":"42"}}"#;

    #[test]
    fn items_come_out_whole_however_the_bytes_are_cut() {
        let want = (
            vec![
                r#"{"metadata":{"name":"a","annotations":{"x":"}]\"{"}}}"#.to_string(),
                r#"{"metadata":{"name":"b"},"spec":{"podCIDRs":["10.0.0.0/24"]}}"#.to_string(),
            ],
            "42".to_string(),
        );
        assert_eq!(scan(&[LIST.as_bytes()]).unwrap(), want);
        let bytes = LIST.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(scan(&[&bytes[..cut], &bytes[cut..]]).unwrap(), want, "cut at {cut}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(scan(&singles).unwrap(), want);
        // The API server's own order (metadata first), with whitespace.
        let pretty = "{\n \"kind\": \"NodeList\", \"metadata\" : {\"resourceVersion\": \"7\", \"continue\": \"\"},\n \"items\": [ {\"a\": [1, {\"b\": 2}]} ] }";
        assert_eq!(scan(&[pretty.as_bytes()]).unwrap(), (vec![r#"{"a": [1, {"b": 2}]}"#.to_string()], "7".into()));
    }

    #[test]
    fn only_one_item_is_held_at_a_time() {
        let item = format!(r#"{{"metadata":{{"name":"n","pad":"{}"}}}}"#, "x".repeat(4000));
        let list = format!(
            r#"{{"kind":"NodeList","metadata":{{"resourceVersion":"1"}},"items":[{}]}}"#,
            vec![item.as_str(); 500].join(",")
        );
        let mut s = ListScanner::default();
        let mut count = 0;
        let mut most = 0;
        for chunk in list.as_bytes().chunks(16 * 1024) {
            s.feed(chunk, |_| count += 1).unwrap();
            most = most.max(s.held());
        }
        assert_eq!(count, 500);
        assert!(most < 64 * 1024, "held {most} bytes of a {} byte list", list.len());
        assert_eq!(s.finish().unwrap(), "1");
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(scan(&[b"[1,2]"]).is_err());
        assert!(scan(&[b"{\"items\":{}}"]).is_err());
        assert!(scan(&[&LIST.as_bytes()[..LIST.len() - 1]]).is_err(), "truncated");
        assert!(scan(&[b"{\"metadata\":{\"resourceVersion\":5},\"items\":[]}"]).is_err());
        assert!(scan(&[b"}}}"]).is_err());
        assert_eq!(scan(&[b"{\"metadata\":{\"resourceVersion\":\"3\"},\"items\":[]}"]).unwrap(), (vec![], "3".into()));
    }
}
