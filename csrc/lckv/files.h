// File helpers shared by every layer (torch-free): atomic writes and run-directory locks.
//
// Atomic write: the bytes go to a temporary file in the target's directory (so the rename never
// crosses filesystems), are flushed to disk (fsync), and the temporary is renamed over the target,
// then the directory is fsynced. A reader (or a crash at any instant) sees either the old file or
// the complete new one. On any failure (a full disk, a missing directory) the temporary is removed
// and FileError names the file and the system's reason.
#pragma once

#include <cstddef>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace lckv {

struct FileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A file being written atomically: write() appends, commit() publishes it under `path`. Destroyed
// without commit() (an exception on the way), it removes its temporary and leaves `path` as it was.
class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  void commit();

 private:
  void close_and_remove() noexcept;
  std::filesystem::path path_, tmp_;
  int fd_ = -1;
};

void write_file_atomically(const std::filesystem::path& path, std::string_view bytes);

// The whole file as bytes; FileError names the file when it cannot be read.
std::string read_file(const std::filesystem::path& path);

// fsync of a directory, so that renames and removals inside it are on disk.
void sync_directory(const std::filesystem::path& dir);

// Renames `path` out of the way (to a hidden sibling) and then deletes it: a crash in between leaves
// a hidden leftover, never a half-deleted `path`. Returns false when `path` did not exist.
bool remove_all_atomically(const std::filesystem::path& path);

// An exclusive lock (flock) on `path` (created if missing) held for the object's lifetime. The OS
// releases it when the process dies, so a killed run never leaves a stale lock. Throws FileError
// naming `what` when another process holds it.
class FileLock {
 public:
  FileLock(const std::filesystem::path& path, const std::string& what);
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  ~FileLock();

 private:
  int fd_ = -1;
};

}  // namespace lckv
