//! A Server-Sent Events parser for response bodies that arrive in arbitrary chunks: lines end in
//! LF, CR or CRLF; an event ends at a blank line; comments and unknown fields are skipped.

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// `event:` (empty means "message").
    pub(crate) event: String,
    /// `data:` lines joined by LF.
    pub(crate) data: String,
    /// `id:`, if the event set one.
    pub(crate) id: Option<String>,
    /// `retry:` in ms, if the event set one.
    pub(crate) retry_ms: Option<u64>,
}

/// Incremental parser.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    pending_cr: bool,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds a chunk; answers the events it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.pending_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            let event = std::mem::take(&mut self.current);
            // an event with no data is not dispatched, but its id and retry still count
            if std::mem::take(&mut self.has_data) || event.retry_ms.is_some() || event.id.is_some()
            {
                out.push(event);
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.current.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.current.id = Some(value.to_owned()),
            "retry" => self.current.retry_ms = value.parse().ok(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        chunks.iter().flat_map(|c| p.push(c)).collect()
    }

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let whole: &[u8] = b"event: message\r\nid: 7\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n: comment\n\ndata: x\rretry: 1500\r\r";
        let expect = vec![
            SseEvent {
                event: "message".into(),
                data: "{\"a\":\n1}".into(),
                id: Some("7".into()),
                retry_ms: None,
            },
            SseEvent { event: String::new(), data: "x".into(), id: None, retry_ms: Some(1500) },
        ];
        assert_eq!(all(&[whole]), expect);
        // byte by byte gives the same
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(all(&bytes), expect);
    }

    #[test]
    fn a_retry_or_id_without_data_still_surfaces() {
        assert_eq!(
            all(&[b"id: 3\nretry: 10\n\n"]),
            vec![SseEvent { id: Some("3".into()), retry_ms: Some(10), ..Default::default() }]
        );
        assert!(all(&[b"event: ping\n\n"]).is_empty());
    }
}
