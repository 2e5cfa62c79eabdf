// lckv/files.h: atomic writes that never leave a partial file or a temporary behind, atomic
// removal, and the output-directory lock.
#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>

#include "lckv/files.h"
#include "test_files.h"

using namespace lckv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lckv::testing::read_bytes;
using lckv::testing::TempDir;

using lckv::testing::entries;

TEST_CASE("write_file_atomically replaces the whole file or nothing", "[files]") {
  const TempDir tmp;
  const fs::path f = tmp.path / "a.json";
  write_file_atomically(f, "first");
  write_file_atomically(f, "second, longer");
  CHECK(read_bytes(f) == "second, longer");
  CHECK(entries(tmp.path) == std::vector<std::string>{"a.json"});
  CHECK_THROWS_WITH(write_file_atomically(tmp.path / "missing" / "b", "x"), Contains("missing/b"));

  // A full disk (a file-size limit: write fails with EFBIG) leaves the old file and no temporary.
  const std::string big(1 << 20, 'x');
  struct rlimit old {};
  getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit small = old;
  small.rlim_cur = 4096;
  auto* handler = std::signal(SIGXFSZ, SIG_IGN);
  setrlimit(RLIMIT_FSIZE, &small);
  std::string message;
  try {
    write_file_atomically(f, big);
  } catch (const FileError& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, handler);
  CHECK_THAT(message, Contains("a.json"));
  CHECK(read_bytes(f) == "second, longer");
  CHECK(entries(tmp.path) == std::vector<std::string>{"a.json"});

  AtomicFile unfinished(tmp.path / "c");
  unfinished.write("partial");
  CHECK(entries(tmp.path).size() == 2);  // the temporary exists while the file is written ...
}

TEST_CASE("an AtomicFile destroyed before commit leaves nothing", "[files]") {
  const TempDir tmp;
  { AtomicFile unfinished(tmp.path / "c"); unfinished.write("partial"); }
  CHECK(entries(tmp.path).empty());
}

TEST_CASE("remove_all_atomically moves a tree away before deleting it", "[files]") {
  const TempDir tmp;
  fs::create_directories(tmp.path / "step_1" / "sub");
  lckv::testing::write_bytes(tmp.path / "step_1" / "sub" / "x", "x");
  CHECK(remove_all_atomically(tmp.path / "step_1"));
  CHECK(entries(tmp.path).empty());
  CHECK_FALSE(remove_all_atomically(tmp.path / "step_1"));
}

TEST_CASE("FileLock: one holder at a time, released when the holder ends (even killed)", "[files]") {
  const TempDir tmp;
  const fs::path lock = tmp.path / ".lock";
  {
    FileLock held(lock, "output directory 'x'");
    CHECK_THROWS_WITH(FileLock(lock, "output directory 'x'"), Contains("in use by another process") && Contains(".lock"));
    // Another process is refused too.
    const pid_t child = fork();
    if (child == 0) {
      try {
        FileLock other(lock, "x");
        _exit(0);
      } catch (const FileError&) {
        _exit(3);
      }
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WEXITSTATUS(status) == 3);
  }
  CHECK_NOTHROW(FileLock(lock, "x"));
  // A holder killed with SIGKILL never leaves a stale lock.
  const pid_t child = fork();
  if (child == 0) {
    for (;;) {
      try {
        FileLock mine(lock, "x");
        pause();
      } catch (const FileError&) {
        usleep(1000);  // the parent's probe holds it for a moment
      }
    }
  }
  bool child_holds = false;
  for (int i = 0; i < 500 && !child_holds; ++i) {
    try {
      FileLock probe(lock, "x");
    } catch (const FileError&) {
      child_holds = true;
    }
    usleep(10000);
  }
  CHECK(child_holds);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  CHECK_NOTHROW(FileLock(lock, "x"));
}
