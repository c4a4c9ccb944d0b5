// compose-check loads a Compose file the way `docker compose config` does and
// prints the resulting project as JSON, or compose-go's error and exit status 1.
//
//	compose-check [FILE...]        # no FILE: compose.yaml / docker-compose.yml in . or above
//
// It uses compose-go, the loader inside Docker Compose v2, with the options
// Compose's `config` command passes: the process environment and a .env file
// beside the Compose file for interpolation, schema validation, normalisation
// (short syntax to long, relative paths to absolute, default networks),
// consistency checks (every referenced service, volume and network exists),
// then the services' env_file entries resolved and container names checked
// for clashes. Nothing talks to a Docker engine, so the output is what Compose
// would send to one, not proof that the images build or the stack runs.
//
// The tests (tests/test_compose.py) build this with `go build` and assert on
// its output; see docs/deployment.md.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-h" || os.Args[1] == "--help") {
		fmt.Fprintln(os.Stderr, "usage: compose-check [FILE...]  (prints the normalised project as JSON)")
		os.Exit(2)
	}
	out, err := load(context.Background(), os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-check:", err)
		os.Exit(1)
	}
	os.Stdout.Write(append(out, '\n'))
}

func load(ctx context.Context, files []string) ([]byte, error) {
	// The same chain of options as Docker Compose's ProjectOptions.toProjectOptions
	// (no --project-directory, --env-file, --profile or --project-name given),
	// followed by those its `config` command adds.
	options, err := cli.NewProjectOptions(files,
		cli.WithWorkingDirectory(""),
		cli.WithOsEnv,
		cli.WithEnvFiles(),
		cli.WithDotEnv,
		cli.WithConfigFileEnv,
		cli.WithDefaultConfigPath,
		cli.WithEnvFiles(),
		cli.WithDotEnv,
		cli.WithDefaultProfiles(),
		cli.WithName(""),
		cli.WithInterpolation(true),
		cli.WithResolvedPaths(true),
		cli.WithNormalization(true),
		cli.WithConsistency(true),
		cli.WithDiscardEnvFile,
	)
	if err != nil {
		return nil, err
	}
	project, err := options.LoadProject(ctx)
	if err != nil {
		return nil, err
	}
	project, err = project.WithServicesEnvironmentResolved(true)
	if err != nil {
		return nil, err
	}
	if err := project.CheckContainerNameUnicity(); err != nil {
		return nil, err
	}
	return project.MarshalJSON()
}
