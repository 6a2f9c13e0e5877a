//! `collections_file`: a pipeline's capture list as a CSV file of `database,collection`
//! rows, no header — the form Streamkap's bulk upload takes, so one list serves both.
//!
//! The file is read when the config is loaded (and again on every SIGHUP, like the rest of
//! the config), so a mistake in it is reported by `tidegate check` and refuses a reload,
//! naming the file and the line. What real exports contain is tolerated: a UTF-8 byte order
//! mark, CRLF line ends, blank lines, spaces around fields, fields in double quotes (`""`
//! inside them is one quote, so names with commas can be written) and `#` comment lines.
//! Anything else that is not two valid names is refused, as is a row listed twice (a
//! duplicate is a copy-paste slip more often than intent, and is cheap to delete).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::pipeline::PipelineConfig;
use super::validate::Problems;

/// The largest capture-list file read: far more rows than any deployment has collections,
/// small enough that a wrong path (a log file, a dump) fails fast instead of filling memory.
pub const MAX_CAPTURE_LIST_BYTES: u64 = 16 * 1024 * 1024;

/// The collections a `collections_file` lists, by database. Set at load time; empty when
/// the pipeline has no file (its scope is then `database`/`collections`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectionList(BTreeMap<String, BTreeSet<String>>);

impl CollectionList {
    /// Whether no collection is listed (no `collections_file`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `db`.`coll` is listed.
    pub fn contains(&self, db: &str, coll: &str) -> bool {
        self.0.get(db).is_some_and(|colls| colls.contains(coll))
    }

    /// The listed collections of each database, databases and collections sorted.
    pub fn by_database(&self) -> impl Iterator<Item = (&String, &BTreeSet<String>)> {
        self.0.iter()
    }

    /// Every listed `(database, collection)`, sorted.
    pub fn namespaces(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0
            .iter()
            .flat_map(|(db, colls)| colls.iter().map(move |coll| (db, coll)))
    }
}

/// Reads the pipeline's `collections_file` (relative to `base`, the config file's folder)
/// into its `collection_list`, and makes the path absolute. The file replaces
/// `collections`, so both at once is refused; with `database`, every row must be in it
/// (the stream is then opened on that database, which a user without cluster-wide
/// privileges needs).
pub(super) fn load(pipeline: &mut PipelineConfig, base: &Path, problems: &mut Problems) {
    let Some(file) = &pipeline.collections_file else {
        return;
    };
    let path = base.join(file);
    let at = format!("pipeline '{}': collections_file", pipeline.id);
    if !pipeline.collections.is_empty() {
        problems.push(format!(
            "{at}: give the capture list in one place, `collections_file` or `collections`"
        ));
    }
    match read(&path, pipeline.database.as_deref()) {
        Ok(list) => pipeline.collection_list = list,
        Err(found) => {
            for problem in found {
                problems.push(format!("{at}: {problem}"));
            }
        }
    }
    pipeline.collections_file = Some(path);
}

/// Reads and parses the capture list at `path`; with `database`, every row must be in it.
/// Every problem is returned, each naming the file (and the line, where there is one).
pub fn read(path: &Path, database: Option<&str>) -> Result<CollectionList, Vec<String>> {
    let name = path.display();
    let size = std::fs::metadata(path)
        .map_err(|err| vec![format!("{name}: cannot read it: {err}")])?
        .len();
    if size > MAX_CAPTURE_LIST_BYTES {
        return Err(vec![format!(
            "{name}: {size} bytes, over the {MAX_CAPTURE_LIST_BYTES}-byte limit of a capture list"
        )]);
    }
    let bytes =
        std::fs::read(path).map_err(|err| vec![format!("{name}: cannot read it: {err}")])?;
    let text = String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        vec![format!("{name}:{line}: not UTF-8 text")]
    })?;
    parse(&text, database).map_err(|problems| {
        problems
            .into_iter()
            .map(|(line, problem)| format!("{name}:{line}: {problem}"))
            .collect()
    })
}

/// Parses capture-list text (with `database`, every row must be in it); problems are
/// `(line number, what is wrong)`.
pub fn parse(text: &str, database: Option<&str>) -> Result<CollectionList, Vec<(usize, String)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut list = CollectionList::default();
    let mut first_seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let row = split_row(line).and_then(|fields| check_row(&fields));
        let (db, coll) = match row {
            Ok(row) => row,
            Err(problem) => {
                problems.push((number, problem));
                continue;
            }
        };
        if let Some(expected) = database.filter(|expected| *expected != db) {
            problems.push((
                number,
                format!(
                    "database {db:?} is not the pipeline's `database` ({expected:?}); \
                     leave `database` out to capture from several databases"
                ),
            ));
            continue;
        }
        if let Some(first) = first_seen.get(&(db.clone(), coll.clone())) {
            problems.push((
                number,
                format!("{db},{coll} is listed twice (first on line {first}); delete one"),
            ));
            continue;
        }
        first_seen.insert((db.clone(), coll.clone()), number);
        list.0.entry(db).or_default().insert(coll);
    }
    if problems.is_empty() && list.is_empty() {
        problems.push((
            1,
            "lists no collection (one `database,collection` per line)".into(),
        ));
    }
    match problems.is_empty() {
        true => Ok(list),
        false => Err(problems),
    }
}

/// One line's fields: split on commas outside double quotes, each trimmed, quotes removed.
fn split_row(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let mut field = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed".into()),
                    Some('"') if chars.next_if_eq(&'"').is_some() => field.push('"'),
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
            if chars.peek().is_some_and(|c| *c != ',') {
                return Err("text after a quoted field's closing quote".into());
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                if c == '"' {
                    return Err(
                        "a quote inside an unquoted field (quote the whole field, with \"\" for a quote)"
                            .into(),
                    );
                }
                field.push(c);
            }
            field = field.trim_end().to_string();
        }
        fields.push(field);
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

/// The row's database and collection, or why MongoDB would not have them.
fn check_row(fields: &[String]) -> Result<(String, String), String> {
    let [db, coll] = fields else {
        let count = fields.len();
        let plural = if count == 1 { "" } else { "s" };
        return Err(format!(
            "{count} field{plural}; a row is `database,collection` (quote a name that holds a comma)"
        ));
    };
    check_database(db)?;
    check_collection(coll)?;
    // MongoDB's limit on a namespace, `db.coll`, in bytes.
    if db.len() + 1 + coll.len() > 255 {
        return Err(format!(
            "{db}.{coll} is longer than MongoDB's 255-byte namespace limit"
        ));
    }
    Ok((db.clone(), coll.clone()))
}

/// MongoDB's rules for database names (those of Windows deployments too, so a list works
/// on any server).
fn check_database(db: &str) -> Result<(), String> {
    if db.is_empty() {
        return Err("the database name is empty".into());
    }
    if let Some(c) = db.chars().find(|c| "/\\. \"$*<>:|?\0".contains(*c)) {
        return Err(format!(
            "database name {:?} holds {c:?}, which MongoDB forbids in database names",
            db.escape_default().to_string()
        ));
    }
    if db.len() >= 64 {
        return Err(format!(
            "database name {db:?} is {} bytes; MongoDB allows at most 63",
            db.len()
        ));
    }
    Ok(())
}

/// MongoDB's rules for collection names, and no `system.` collections (change streams do
/// not report them).
fn check_collection(coll: &str) -> Result<(), String> {
    if coll.is_empty() {
        return Err("the collection name is empty".into());
    }
    if let Some(c) = coll.chars().find(|c| ['$', '\0'].contains(c)) {
        return Err(format!(
            "collection name {:?} holds {c:?}, which MongoDB forbids in collection names",
            coll.escape_default().to_string()
        ));
    }
    if coll.starts_with("system.") {
        return Err(format!(
            "{coll:?} is a system collection; change streams do not report them"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(list: &CollectionList) -> Vec<(String, String)> {
        list.namespaces()
            .map(|(db, coll)| (db.clone(), coll.clone()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(db, coll)| (db.to_string(), coll.to_string()))
            .collect()
    }

    /// The problem reported for `text`, which must have exactly one.
    fn problem(text: &str) -> (usize, String) {
        let mut problems = parse(text, None).expect_err("refused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.remove(0)
    }

    #[test]
    fn plain_rows_are_read() {
        let list = parse("shop,orders\nshop,customers\ncrm,users\n", None).expect("valid");
        assert_eq!(
            rows(&list),
            pairs(&[("crm", "users"), ("shop", "customers"), ("shop", "orders")])
        );
        assert!(list.contains("shop", "orders"));
        assert!(!list.contains("shop", "users"));
        assert!(!list.contains("crm", "orders"));
    }

    #[test]
    fn export_quirks_are_tolerated() {
        let text = "\u{feff}shop,orders\r\n\r\n   \r\n  crm , users  \r\n# a comment\r\n\
                    \"shop\",\"a,b\"\r\n \"shop\" , \"say \"\"hi\"\"\" \r\nlast,row";
        let list = parse(text, None).expect("valid");
        assert_eq!(
            rows(&list),
            pairs(&[
                ("crm", "users"),
                ("last", "row"),
                ("shop", "a,b"),
                ("shop", "orders"),
                ("shop", "say \"hi\""),
            ])
        );
    }

    #[test]
    fn dotted_collection_names_are_allowed() {
        let list = parse("shop,orders.archive", None).expect("valid");
        assert!(list.contains("shop", "orders.archive"));
    }

    #[test]
    fn wrong_field_counts_are_refused_with_their_line() {
        let (line, message) = problem("shop,orders\nshop,orders,extra\n");
        assert_eq!(line, 2);
        assert!(message.contains("3 fields"), "{message}");
        let (line, message) = problem("\n\nshop\n");
        assert_eq!(line, 3);
        assert!(message.contains("1 field;"), "{message}");
    }

    #[test]
    fn empty_names_are_refused() {
        assert!(problem("shop,\n").1.contains("collection name is empty"));
        assert!(problem(",orders\n").1.contains("database name is empty"));
        assert!(problem("\"\" , orders\n")
            .1
            .contains("database name is empty"));
    }

    #[test]
    fn names_mongodb_forbids_are_refused() {
        for (text, needle) in [
            ("sh$op,orders", "forbids in database names"),
            ("sh.op,orders", "forbids in database names"),
            ("sh op,orders", "forbids in database names"),
            ("shop,or$ders", "forbids in collection names"),
            ("shop,or\0ders", "forbids in collection names"),
            ("sh\0op,orders", "forbids in database names"),
            ("shop,system.views", "system collection"),
        ] {
            let (line, message) = problem(text);
            assert_eq!(line, 1);
            assert!(message.contains(needle), "{text:?}: {message}");
        }
        let long = format!("{},orders", "d".repeat(64));
        assert!(problem(&long).1.contains("at most 63"));
        let long = format!("shop,{}", "c".repeat(251));
        assert!(problem(&long).1.contains("255-byte"));
    }

    #[test]
    fn broken_quotes_are_refused() {
        assert!(problem("shop,\"orders\n").1.contains("not closed"));
        assert!(problem("shop,\"orders\"x\n").1.contains("closing quote"));
        assert!(problem("shop,ord\"ers\n").1.contains("quote inside"));
    }

    #[test]
    fn duplicates_are_refused_naming_both_lines() {
        let (line, message) = problem("shop,orders\ncrm,users\n shop , \"orders\"\n");
        assert_eq!(line, 3);
        assert!(message.contains("first on line 1"), "{message}");
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = parse("shop\nshop,orders\n,x\nshop,orders\n", None).expect_err("refused");
        let lines: Vec<usize> = problems.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, vec![1, 3, 4]);
    }

    #[test]
    fn rows_outside_the_pipelines_database_are_refused() {
        let list = parse("shop,orders\nshop,users\n", Some("shop")).expect("valid");
        assert!(list.contains("shop", "users"));
        let problems = parse("shop,orders\ncrm,users\n", Some("shop")).expect_err("refused");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, 2);
        assert!(
            problems[0].1.contains("not the pipeline's `database`"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(problem("").1.contains("lists no collection"));
        assert!(problem("\u{feff}# only a comment\r\n\r\n")
            .1
            .contains("lists no collection"));
    }

    #[test]
    fn files_are_named_in_problems() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capture.csv");
        std::fs::write(&path, "shop,orders\nshop,a,b\n").expect("write");
        let problems = read(&path, None).expect_err("refused");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(&format!("{}:2: ", path.display())),
            "{problems:?}"
        );
        std::fs::write(&path, b"shop,orders\nshop,\xff\n").expect("write");
        let problems = read(&path, None).expect_err("refused");
        assert_eq!(
            problems,
            vec![format!("{}:2: not UTF-8 text", path.display())]
        );
        let missing = read(&dir.path().join("nope.csv"), None).expect_err("refused");
        assert!(
            missing[0].contains("nope.csv: cannot read it"),
            "{missing:?}"
        );
    }
}
