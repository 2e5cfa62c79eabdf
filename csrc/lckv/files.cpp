#include "lckv/files.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace lckv {

namespace fs = std::filesystem;

namespace {

std::string reason() { return std::strerror(errno); }

// Unique per process and call: two writers of one file (threads or processes) never share a temporary.
std::string temp_suffix() {
  static std::atomic<unsigned> counter{0};
  return ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
}

}  // namespace

AtomicFile::AtomicFile(fs::path path) : path_(std::move(path)) {
  tmp_ = path_.parent_path() / ("." + path_.filename().string() + temp_suffix());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) throw FileError("cannot write '" + path_.string() + "': cannot create '" + tmp_.string() + "': " + reason());
}

AtomicFile::~AtomicFile() { close_and_remove(); }

void AtomicFile::close_and_remove() noexcept {
  if (fd_ < 0) return;
  ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (fd_ < 0) throw FileError("cannot write '" + path_.string() + "': the file was already committed");
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? reason() : "no bytes written";
      close_and_remove();
      throw FileError("cannot write '" + path_.string() + "': " + why);
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) throw FileError("cannot write '" + path_.string() + "': the file was already committed");
  // Data on disk before the rename publishes it; close() can report a deferred write error.
  if (::fsync(fd_) != 0 || ::close(fd_) != 0) {
    const std::string why = reason();
    fd_ = -1;
    ::unlink(tmp_.c_str());
    throw FileError("cannot write '" + path_.string() + "': " + why);
  }
  fd_ = -1;
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = reason();
    ::unlink(tmp_.c_str());
    throw FileError("cannot write '" + path_.string() + "': rename from '" + tmp_.string() + "' failed: " + why);
  }
  sync_directory(path_.parent_path());
}

void write_file_atomically(const fs::path& path, std::string_view bytes) {
  AtomicFile file(path);
  file.write(bytes);
  file.commit();
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError("cannot open '" + path.string() + "': " + reason());
  std::ostringstream out;
  out << in.rdbuf();
  if (in.bad()) throw FileError("cannot read '" + path.string() + "'");
  return out.str();
}

void sync_directory(const fs::path& dir) {
  const fs::path d = dir.empty() ? fs::path(".") : dir;
  const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: the rename itself has happened
  ::fsync(fd);
  ::close(fd);
}

bool remove_all_atomically(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(path, ec))) return false;
  const fs::path trash = path.parent_path() / (".trash_" + path.filename().string() + temp_suffix());
  fs::rename(path, trash, ec);
  if (ec) throw FileError("cannot remove '" + path.string() + "': " + ec.message());
  sync_directory(path.parent_path());
  fs::remove_all(trash, ec);
  if (ec) throw FileError("cannot remove '" + trash.string() + "': " + ec.message());
  return true;
}

FileLock::FileLock(const fs::path& path, const std::string& what) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw FileError("cannot lock " + what + ": cannot open '" + path.string() + "': " + reason());
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const bool busy = errno == EWOULDBLOCK;
    const std::string why = reason();
    ::close(fd_);
    fd_ = -1;
    throw FileError(busy ? what + " is in use by another process (it holds the lock '" + path.string() + "')"
                         : "cannot lock " + what + " ('" + path.string() + "'): " + why);
  }
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

}  // namespace lckv
