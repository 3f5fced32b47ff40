package container

import "github.com/sandboxd/sandboxd/internal/agent"

// The agent client; variables so that nothing else needs to know.
var (
	agentWaitReady = agent.WaitReady
	agentRun       = agent.Run
)
