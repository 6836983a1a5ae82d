//! The credential tools: `millet passwd FILE USER` (argon2id password file)
//! and `millet scram FILE USER` (SCRAM-SHA-256 credentials file).
//!
//! Both add or update a user (`--password PW`, or the password prompted
//! for, or read from standard input) or delete one (`--delete`), say what
//! they did on standard output, and rewrite the file atomically (mode 0600)
//! keeping its comments, blank lines and order.
//!
//! Where the password comes from, unless `--password` gives it:
//! - standard input is a terminal: prompted for twice, without echo; the two
//!   must match, otherwise nothing is written;
//! - otherwise (scripts): the first line of standard input.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::security::{passwd, scram};

/// A `user:value` file: one entry per line, `#` comments and blank lines
/// kept as they are. The password file and the SCRAM credentials file are
/// both of this form; what a value is, is checked by the caller.
#[derive(Debug, Clone, Default)]
pub struct UserFile {
    lines: Vec<Line>,
    index: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
enum Line {
    Other(String),
    Entry { user: String, value: String },
}

/// Whether `user` can be stored in a [`UserFile`] and read back as itself:
/// not empty, no `:` or line break, no surrounding white space, and not
/// starting with `#` (a comment).
pub fn valid_username(user: &str) -> bool {
    !user.is_empty()
        && !user.contains([':', '\n', '\r'])
        && user.trim() == user
        && !user.starts_with('#')
}

impl UserFile {
    /// Parse `text`; `check` validates each entry's value. Errors carry the
    /// 1-based line number.
    pub fn parse(
        text: &str,
        mut check: impl FnMut(&str) -> Result<(), String>,
    ) -> Result<UserFile, (usize, String)> {
        let mut f = UserFile::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                f.lines.push(Line::Other(raw.to_string()));
                continue;
            }
            let Some((user, value)) = line.split_once(':') else {
                return Err((i + 1, "expected username:credential".into()));
            };
            check(value).map_err(|msg| (i + 1, msg))?;
            if f.index.contains_key(user) {
                return Err((i + 1, format!("duplicate user {user:?}")));
            }
            f.index.insert(user.to_string(), f.lines.len());
            f.lines.push(Line::Entry {
                user: user.to_string(),
                value: value.to_string(),
            });
        }
        Ok(f)
    }

    /// The entries, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Entry { user, value } => Some((user.as_str(), value.as_str())),
            Line::Other(_) => None,
        })
    }

    /// The value stored for `user`.
    pub fn get(&self, user: &str) -> Option<&str> {
        match self.lines.get(*self.index.get(user)?) {
            Some(Line::Entry { value, .. }) => Some(value),
            _ => None,
        }
    }

    /// Add or replace `user` (the caller checked [`valid_username`] and the
    /// value). Returns whether the user existed.
    pub fn set(&mut self, user: &str, value: String) -> bool {
        let entry = Line::Entry {
            user: user.to_string(),
            value,
        };
        match self.index.get(user) {
            Some(&i) => {
                self.lines[i] = entry;
                true
            }
            None => {
                self.index.insert(user.to_string(), self.lines.len());
                self.lines.push(entry);
                false
            }
        }
    }

    /// Remove `user`; `false` if absent.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.lines.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        true
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            match l {
                Line::Other(s) => out.push_str(s),
                Line::Entry { user, value } => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(value);
                }
            }
            out.push('\n');
        }
        out
    }

    /// Write the file atomically: a temporary file created with mode 0600
    /// (Unix), synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        #[cfg(unix)]
        {
            // An existing temporary file keeps its mode: set it.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    }
}

/// One credential tool: its name, usage, and what a stored value is.
pub struct Tool {
    /// The subcommand (`passwd`, `scram`).
    pub name: &'static str,
    pub usage: &'static str,
    /// Whether `--iterations N` is accepted.
    pub takes_iterations: bool,
    /// Validate a value read from the file.
    pub check: fn(&str) -> Result<(), String>,
    /// The value to store for a password (and `--iterations`, if taken).
    pub make: fn(&str, Option<u32>) -> Result<String, String>,
}

/// `millet passwd`: argon2id PHC hashes.
pub const PASSWD: Tool = Tool {
    name: "passwd",
    usage: "usage: millet passwd FILE USER [--password PASSWORD | --delete]\n\
            Adds or updates USER in the argon2id password FILE (created if missing), or deletes USER.\n\
            Without --password the password is prompted for twice without echo on a terminal,\n\
            or read from the first line of standard input otherwise.",
    takes_iterations: false,
    check: passwd::check_hash,
    make: |pw, _| passwd::hash_password(pw).map_err(|e| e.to_string()),
};

/// Lowest `--iterations` accepted (RFC 7677's minimum).
pub const MIN_SCRAM_ITERATIONS: u32 = scram::DEFAULT_ITERATIONS;

/// `millet scram`: SCRAM-SHA-256 credentials.
pub const SCRAM: Tool = Tool {
    name: "scram",
    usage: "usage: millet scram FILE USER [--password PASSWORD | --delete] [--iterations N]\n\
            Adds or updates USER in the SCRAM-SHA-256 credentials FILE (created if missing), or deletes USER.\n\
            --iterations: PBKDF2 iterations, at least 4096 (the default).\n\
            Without --password the password is prompted for twice without echo on a terminal,\n\
            or read from the first line of standard input otherwise.",
    takes_iterations: true,
    check: |v| {
        scram::ScramCredential::decode(v)
            .map(drop)
            .ok_or_else(|| "bad SCRAM credential".to_string())
    },
    make: |pw, iterations| {
        let n = iterations.unwrap_or(scram::DEFAULT_ITERATIONS);
        Ok(scram::ScramCredential::generate(pw.as_bytes(), n).encode())
    },
};

/// Where a password comes from when `--password` is not given.
pub enum PasswordInput<'a> {
    /// Standard input is a terminal: prompt (without echo) with the given
    /// text and return the line typed.
    Terminal(&'a mut dyn FnMut(&str) -> std::io::Result<String>),
    /// Not a terminal: the first line of this reader.
    Lines(&'a mut dyn BufRead),
}

/// What a successful run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `--help`: the usage text.
    Help(&'static str),
    /// What was done, e.g. `added user alice to /etc/millet/passwd`.
    Done(String),
}

#[derive(Debug, Default)]
struct Args {
    file: String,
    user: String,
    password: Option<String>,
    delete: bool,
    iterations: Option<u32>,
}

fn parse_args(tool: &Tool, args: &[String]) -> Result<Option<Args>, String> {
    let usage = |msg: String| format!("{msg}\n{}", tool.usage);
    let mut positional = Vec::new();
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match flag {
            "--help" | "-h" => return Ok(None),
            "--delete" | "-D" => a.delete = true,
            "--password" | "-p" => a.password = Some(value("--password")?),
            "--iterations" | "-i" if tool.takes_iterations => {
                let v = value("--iterations")?;
                let n: u32 = v
                    .parse()
                    .map_err(|_| usage(format!("--iterations {v:?}: not a number")))?;
                if n < MIN_SCRAM_ITERATIONS {
                    return Err(format!(
                        "--iterations {n}: at least {MIN_SCRAM_ITERATIONS} (RFC 7677)"
                    ));
                }
                a.iterations = Some(n);
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(usage(format!("unknown option {s}")))
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [file, user] = positional.as_slice() else {
        return Err(usage("expected FILE and USER".into()));
    };
    if a.delete && (a.password.is_some() || a.iterations.is_some()) {
        return Err(usage(
            "--delete excludes --password and --iterations".into(),
        ));
    }
    if !valid_username(user) {
        return Err(format!(
            "invalid username {user:?} (empty, contains ':' or a line break, \
             surrounded by spaces, or starts with '#')"
        ));
    }
    a.file = file.clone();
    a.user = user.clone();
    Ok(Some(a))
}

/// The new password: `--password`, else prompted for twice (terminal), else
/// the first line of input.
fn new_password(given: Option<String>, input: PasswordInput<'_>) -> Result<String, String> {
    let pw = match (given, input) {
        (Some(p), _) => p,
        (None, PasswordInput::Terminal(prompt)) => {
            let first =
                prompt("Password: ").map_err(|e| format!("cannot read the password: {e}"))?;
            if first.is_empty() {
                return Err("empty password; nothing written".into());
            }
            let again = prompt("Confirm password: ")
                .map_err(|e| format!("cannot read the password: {e}"))?;
            if again != first {
                return Err("the passwords do not match; nothing written".into());
            }
            first
        }
        (None, PasswordInput::Lines(r)) => {
            let mut line = String::new();
            r.read_line(&mut line)
                .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if pw.is_empty() {
        return Err("empty password; nothing written".into());
    }
    Ok(pw)
}

/// Run `tool` with `args` (after the subcommand name).
pub fn run(tool: &Tool, args: &[String], input: PasswordInput<'_>) -> Result<Report, String> {
    let Some(a) = parse_args(tool, args)? else {
        return Ok(Report::Help(tool.usage));
    };
    let path = Path::new(&a.file);
    let mut file = match std::fs::read_to_string(path) {
        Ok(text) => UserFile::parse(&text, tool.check)
            .map_err(|(line, msg)| format!("{}: line {line}: {msg}", a.file))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !a.delete => UserFile::default(),
        Err(e) => return Err(format!("cannot read {}: {e}", a.file)),
    };
    let done = if a.delete {
        if !file.remove(&a.user) {
            return Err(format!("no user {:?} in {}", a.user, a.file));
        }
        format!("deleted user {} from {}", a.user, a.file)
    } else {
        let pw = new_password(a.password, input)?;
        let value = (tool.make)(&pw, a.iterations)?;
        if file.set(&a.user, value) {
            format!("updated the password of user {} in {}", a.user, a.file)
        } else {
            format!("added user {} to {}", a.user, a.file)
        }
    };
    file.save(path)
        .map_err(|e| format!("cannot write {}: {e}", a.file))?;
    Ok(Report::Done(done))
}

/// The subcommands, dispatched before the gateway's own flags are parsed:
/// `None` when `args[1]` is not one of them.
pub fn dispatch(args: &[String]) -> Option<ExitCode> {
    let tool = match args.get(1)?.as_str() {
        "passwd" => &PASSWD,
        "scram" => &SCRAM,
        _ => return None,
    };
    let rest = args.get(2..).unwrap_or_default();
    let stdin = std::io::stdin();
    let mut prompt = |text: &str| rpassword::prompt_password(text);
    let mut lines;
    let input = if stdin.is_terminal() {
        PasswordInput::Terminal(&mut prompt)
    } else {
        lines = stdin.lock();
        PasswordInput::Lines(&mut lines)
    };
    Some(match run(tool, rest, input) {
        Ok(Report::Help(usage)) => {
            println!("{usage}");
            ExitCode::SUCCESS
        }
        Ok(Report::Done(what)) => {
            println!("millet {}: {what}", tool.name);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("millet {}: {e}", tool.name);
            ExitCode::from(2)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A scripted terminal: answers the prompts in order, records them.
    struct Tty {
        answers: Vec<&'static str>,
        prompts: Vec<String>,
    }

    impl Tty {
        fn new(answers: &[&'static str]) -> Tty {
            Tty {
                answers: answers.iter().rev().copied().collect(),
                prompts: Vec::new(),
            }
        }

        fn run(&mut self, tool: &Tool, a: &[String]) -> Result<Report, String> {
            let mut prompt = |p: &str| {
                self.prompts.push(p.to_string());
                self.answers
                    .pop()
                    .map(str::to_string)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            };
            run(tool, a, PasswordInput::Terminal(&mut prompt))
        }
    }

    fn lines(tool: &Tool, a: &[String], stdin: &[u8]) -> Result<Report, String> {
        let mut r = stdin;
        run(tool, a, PasswordInput::Lines(&mut r))
    }

    fn done(s: &str) -> Result<Report, String> {
        Ok(Report::Done(s.to_string()))
    }

    #[test]
    fn user_file_keeps_comments_and_order() {
        let text = "# users\nalice:a\n\n  # indented comment\nbob:b\n";
        let ok = |_: &str| Ok(());
        let mut f = UserFile::parse(text, ok).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.render(), text);
        assert_eq!(f.get("bob"), Some("b"));
        assert!(f.set("alice", "A".into()));
        assert!(!f.set("carol", "c".into()));
        assert!(f.remove("bob"));
        assert!(!f.remove("bob"));
        assert_eq!(f.get("carol"), Some("c"));
        assert_eq!(
            f.render(),
            "# users\nalice:A\n\n  # indented comment\ncarol:c\n"
        );
        let entries: Vec<_> = f.entries().collect();
        assert_eq!(entries, [("alice", "A"), ("carol", "c")]);
        assert_eq!(UserFile::parse("a:1\na:2\n", ok).unwrap_err().0, 2);
        assert_eq!(UserFile::parse("\nnocolon\n", ok).unwrap_err().0, 2);
        let picky = |v: &str| if v == "x" { Err("bad".into()) } else { Ok(()) };
        assert_eq!(
            UserFile::parse("a:1\nb:x\n", picky).unwrap_err(),
            (2, "bad".to_string())
        );
    }

    #[test]
    fn usernames() {
        for ok in ["alice", "a b", "dev-1@site", "a=b,c"] {
            assert!(valid_username(ok), "{ok}");
        }
        for bad in ["", "a:b", "a\nb", " a", "a ", "#a", "a\r"] {
            assert!(!valid_username(bad), "{bad:?}");
        }
    }

    #[test]
    fn argument_handling() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f").to_string_lossy().to_string();
        let f = file.as_str();
        let err = |tool: &Tool, a: &[&str]| lines(tool, &args(a), b"pw\n").unwrap_err();
        assert!(err(&PASSWD, &[f]).contains("expected FILE and USER"));
        assert!(err(&PASSWD, &[f, "a", "b"]).contains("expected FILE and USER"));
        assert!(err(&PASSWD, &[f, "a", "--bogus"]).contains("unknown option --bogus"));
        assert!(err(&PASSWD, &[f, "a", "--password"]).contains("--password needs a value"));
        // passwd has no iterations
        assert!(err(&PASSWD, &[f, "a", "--iterations", "5000"]).contains("unknown option"));
        assert!(err(&SCRAM, &[f, "a", "--iterations", "many"]).contains("not a number"));
        assert!(err(&SCRAM, &[f, "a", "--iterations", "4095"]).contains("at least 4096"));
        assert!(err(&SCRAM, &[f, "a", "--delete", "--password", "x"]).contains("excludes"));
        assert!(err(&SCRAM, &[f, "a", "--delete", "--iterations=5000"]).contains("excludes"));
        assert!(err(&PASSWD, &[f, "#a"]).contains("invalid username"));
        assert!(err(&PASSWD, &[f, "a:b"]).contains("invalid username"));
        // deleting from a missing file, or a missing user
        assert!(err(&PASSWD, &[f, "a", "--delete"]).contains("cannot read"));
        assert_eq!(
            lines(&PASSWD, &args(&["--help"]), b""),
            Ok(Report::Help(PASSWD.usage))
        );
        assert!(!Path::new(f).exists(), "no error may write the file");
        // empty password from standard input
        assert!(lines(&PASSWD, &args(&[f, "a"]), b"\n")
            .unwrap_err()
            .contains("empty password"));
        assert!(!Path::new(f).exists());
    }

    #[test]
    fn passwd_add_update_delete_and_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let f = path.to_string_lossy().to_string();
        std::fs::write(&path, "# ops\n").unwrap();
        assert_eq!(
            lines(&PASSWD, &args(&[&f, "alice"]), b"s3cret\nignored\n"),
            done(&format!("added user alice to {f}"))
        );
        assert_eq!(
            lines(&PASSWD, &args(&[&f, "--password=pw", "bob"]), b""),
            done(&format!("added user bob to {f}"))
        );
        assert_eq!(
            lines(&PASSWD, &args(&[&f, "alice", "-p", "new"]), b""),
            done(&format!("updated the password of user alice in {f}"))
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# ops\nalice:$argon2id$"), "{text}");
        assert!(!text.contains("s3cret") && !text.contains(":new"));
        let pf = passwd::PasswordFile::load(&path).unwrap();
        assert!(pf.verify("alice", b"new"));
        assert!(pf.verify("bob", b"pw"));
        assert_eq!(
            lines(&PASSWD, &args(&[&f, "alice", "--delete"]), b""),
            done(&format!("deleted user alice from {f}"))
        );
        let err = lines(&PASSWD, &args(&[&f, "alice", "--delete"]), b"").unwrap_err();
        assert_eq!(err, format!("no user \"alice\" in {f}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn terminal_prompts_twice_and_refuses_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scram");
        let f = path.to_string_lossy().to_string();
        // mismatch: error, nothing written
        let mut tty = Tty::new(&["pencil", "pencl"]);
        let err = tty.run(&SCRAM, &args(&[&f, "user"])).unwrap_err();
        assert!(err.contains("do not match"), "{err}");
        assert_eq!(tty.prompts, ["Password: ", "Confirm password: "]);
        assert!(!path.exists());
        // empty at the first prompt: no second prompt
        let mut tty = Tty::new(&[""]);
        assert!(tty
            .run(&SCRAM, &args(&[&f, "user"]))
            .unwrap_err()
            .contains("empty password"));
        assert_eq!(tty.prompts.len(), 1);
        // the prompt failing (no terminal after all)
        let mut tty = Tty::new(&[]);
        assert!(tty
            .run(&SCRAM, &args(&[&f, "user"]))
            .unwrap_err()
            .contains("cannot read the password"));
        // match: written
        let mut tty = Tty::new(&["pencil", "pencil"]);
        assert_eq!(
            tty.run(&SCRAM, &args(&[&f, "user", "--iterations", "5000"])),
            done(&format!("added user user to {f}"))
        );
        // --password: no prompt at all
        let mut tty = Tty::new(&[]);
        assert_eq!(
            tty.run(&SCRAM, &args(&[&f, "other", "--password", "pw"])),
            done(&format!("added user other to {f}"))
        );
        assert!(tty.prompts.is_empty());
        let creds = scram::parse_credentials(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let user = creds.get("user").unwrap();
        assert_eq!(user.iterations, 5000);
        assert_eq!(
            *user,
            scram::ScramCredential::derive(b"pencil", &user.salt, 5000)
        );
        let other = creds.get("other").unwrap();
        assert_eq!(other.iterations, scram::DEFAULT_ITERATIONS);
        assert_eq!(
            *other,
            scram::ScramCredential::derive(b"pw", &other.salt, other.iterations)
        );
    }

    #[test]
    fn scram_file_is_validated_and_edited_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scram");
        let f = path.to_string_lossy().to_string();
        std::fs::write(&path, "# scram users\nbroken:SCRAM-SHA-256$nope\n").unwrap();
        let err = lines(&SCRAM, &args(&[&f, "a", "-p", "x"]), b"").unwrap_err();
        assert_eq!(err, format!("{f}: line 2: bad SCRAM credential"));
        std::fs::write(&path, "# scram users\n").unwrap();
        lines(&SCRAM, &args(&[&f, "b", "-p", "x"]), b"").unwrap();
        lines(&SCRAM, &args(&[&f, "a", "-p", "y"]), b"").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# scram users\nb:SCRAM-SHA-256$4096:"),
            "{text}"
        );
        assert_eq!(
            lines(&SCRAM, &args(&[&f, "b", "--delete"]), b""),
            done(&format!("deleted user b from {f}"))
        );
        let store = scram::ScramStore::from_file(&path).unwrap();
        assert!(store.get("a").is_some() && store.get("b").is_none());
    }
}
