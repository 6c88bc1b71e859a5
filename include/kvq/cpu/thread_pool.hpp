#pragma once
// Executors for the parallel CPU paths (decode attention over heads x sequence chunks). Callers can
// plug their own pool by implementing Executor; ThreadPool is a simple internal default.
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvq::cpu {

class Executor {
public:
    virtual ~Executor() = default;
    // Threads that may run tasks at once (the calling thread included).
    virtual int concurrency() const = 0;
    // Runs f(i) for every i in [0, n) and returns when all are done. Tasks must be independent.
    virtual void parallel_for(int n, const std::function<void(int)>& f) = 0;
};

// Runs everything on the calling thread.
class SerialExecutor final : public Executor {
public:
    int concurrency() const override { return 1; }
    void parallel_for(int n, const std::function<void(int)>& f) override {
        for (int i = 0; i < n; ++i) f(i);
    }
};

// n_threads - 1 workers plus the calling thread, tasks handed out through a shared counter.
// One parallel_for at a time (calls from several threads are serialised).
class ThreadPool final : public Executor {
public:
    explicit ThreadPool(int n_threads = static_cast<int>(std::thread::hardware_concurrency())) {
        n_ = n_threads < 1 ? 1 : n_threads;
        for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { worker_loop(); });
    }
    ~ThreadPool() override {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int concurrency() const override { return n_; }

    void parallel_for(int n, const std::function<void(int)>& f) override {
        if (n <= 0) return;
        if (n_ == 1 || n == 1) {
            for (int i = 0; i < n; ++i) f(i);
            return;
        }
        std::lock_guard<std::mutex> call(call_m_);
        {
            std::lock_guard<std::mutex> lk(m_);
            job_ = &f;
            n_tasks_ = n;
            next_ = 0;
            pending_ = n;
            error_ = nullptr;
            ++generation_;
        }
        cv_.notify_all();
        run_tasks();
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, [&] { return pending_ == 0; });
        job_ = nullptr;
        if (error_) std::rethrow_exception(error_);
    }

private:
    void run_tasks() {
        for (;;) {
            int i;
            const std::function<void(int)>* f;
            {
                std::lock_guard<std::mutex> lk(m_);
                if (!job_ || next_ >= n_tasks_) return;
                i = next_++;
                f = job_;
            }
            try {
                (*f)(i);
            } catch (...) {
                std::lock_guard<std::mutex> lk(m_);
                if (!error_) error_ = std::current_exception();
            }
            std::lock_guard<std::mutex> lk(m_);
            if (--pending_ == 0) done_cv_.notify_all();
        }
    }
    void worker_loop() {
        unsigned long seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            run_tasks();
        }
    }

    int n_ = 1;
    std::vector<std::thread> workers_;
    std::mutex m_, call_m_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(int)>* job_ = nullptr;
    int n_tasks_ = 0, next_ = 0, pending_ = 0;
    unsigned long generation_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

}  // namespace kvq::cpu
